"""One decoding step, top to bottom, over a stage backend: the engine's (`DeviceStages`: the spec stages on this
device, as CUDA graphs where they can be) or `bench.simulate`'s (recorded trees, modelled times). One loop, so a
change to the step is made once.

A backend has: `plain(view)`, `root(view, k)`, `level(view, size, newest, levels, width, k)`, `tree(B, size)` (the
drafted tree, for a policy that reads it), `choose(view, selected, size)` (close a host selection under
ancestors; returns what `verify` needs) and `verify(view, chosen, shape, size, levels) -> (emit width, verify width,
nodes)`."""
from __future__ import annotations

from drafting.policy.strategy import DraftStrategy, StepView
from drafting.runtime.timing import StepTimer


def plan(policy: DraftStrategy, view: StepView):
    """The step's shape: None for a plain step; with host decisions True (levels are decided as they come) or
    "chain" (the rollout chains alone); otherwise a StepShape (levels 0: the chains alone)."""
    if policy.host_decisions:
        return policy.plan(view) or None
    return policy.plan_shape(view)


def drafts_model(shape) -> bool:
    """Whether a planned step runs the draft model (else it verifies the rollout chains alone)."""
    return shape is True or getattr(shape, "levels", 0) > 0


def run_step(stages, policy: DraftStrategy, view: StepView, timer: StepTimer) -> int:
    """Plan; place the rows' rollout chains (with rollout drafts) and draft the tree level by level while the policy
    wants more (and the rows' K/V have room: `node_cap`); choose the nodes; verify them in one target forward.
    Returns how many tokens a row may have emitted (the width of the step's output)."""
    chain = getattr(stages, "chain", 0)  # the nodes a rollout chain takes in every tree
    with timer.host("policy"):
        shape = plan(policy, view) if view.node_cap >= max(chain, 1) else None  # no room for a tree: plain
        if shape is not None and drafts_model(shape) and view.node_cap < chain + policy.topk:
            shape = None
    if shape is None:
        with timer.stage("plain"):
            stages.plain(view)
        timer.log.update({"plain": True, "levels": 0, "nodes": 0})
        return 1
    k = policy.topk if drafts_model(shape) else 0
    timer.log["t_levels"] = []
    with timer.stage("root"):
        stages.root(view, k)  # the chains, then the draft's catch-up and the tree's first level
    levels, size, newest, widths = (1 if k else 0), chain + k, k, []
    while k:
        with timer.host("policy"):
            width = policy.next_width(view, shape, levels, newest, lambda: stages.tree(view.live, size))
        if not width or size + width * k > view.node_cap:  # deeper than the K/V memory has room for
            break
        with timer.stage("level"):
            stages.level(view, size, newest, levels, width, k)
        widths.append(width)
        size, newest, levels = size + width * k, width * k, levels + 1
    with timer.host("policy"):
        chosen = (stages.choose(view, policy.select(stages.tree(view.live, size), view), size)
                  if policy.host_decisions else None)
    with timer.stage("verify"):
        emit, width, nodes = stages.verify(view, chosen, shape, size, levels)
    timer.log.update({"plain": False, "levels": levels, "level_widths": widths, "width": width, "nodes": nodes})
    return emit
