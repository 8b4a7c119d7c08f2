"""The single controller: one RLHF iteration reads top to bottom as the algorithm (verl's `fit()`)."""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

from configs.schema import Config
from drafting import GenRequest, SamplingParams
from trainer.core import algorithms as algo
from trainer.loop.checkpoint import CheckpointManager
from trainer.loop.data import Prompt, PromptSampler
from trainer.loop.deadline import wait
from trainer.core.experience import Experience, make_sequences
from trainer.loop.rollout import RolloutFleet, rollout_draft_metrics
from trainer.loop.rollout import history_store as new_history_store
from trainer.loop.tracking import Tracking


@dataclass
class Rollout:
    prompt: Prompt
    sample: int  # k-th sample of this prompt
    token_ids: list[int]
    finish_reason: str
    stats: dict


@contextmanager
def timed(times: dict, name: str):
    start = time.perf_counter()
    yield
    times[name] = time.perf_counter() - start


EVAL_STREAM = 2**32 - 1  # the seed stream of evaluation samples: never an iteration number


def request_seed(seed: int, iteration: int, position: int) -> int:
    """A sampling seed per request that depends only on where it is in the run: resume-exact."""
    return int(np.random.SeedSequence([seed, iteration, position]).generate_state(1, np.uint64)[0] >> 1)


def prompt_id(prompt: Prompt) -> int:
    """The key of a prompt's history (earlier epochs' responses): its row in the prompt file. Stable across
    shuffles, epochs and resumes (a checkpoint's data cursor refuses another file), small to keep and to save; two
    rows of the same text keep separate histories, which costs only drafts."""
    return prompt.index


def training_requests(cfg: Config, prompts: list[Prompt], iteration: int, history=None) -> tuple[list, dict]:
    """An iteration's requests, samples_per_prompt per prompt, adjacent, and {request id: (prompt, sample)}. The
    samples of prompt i form request group "iteration:i" (rollout drafts: siblings draft from each other), and each
    brings the prompt's history from the driver's HistoryStore (None: rollout drafts off)."""
    g, k = cfg.generation, cfg.trainer.samples_per_prompt
    requests, owners = [], {}
    for i, prompt in enumerate(prompts):
        earlier = history.get(prompt_id(prompt)) if history is not None else None
        for s in range(k):
            rid = f"{iteration}:{i}:{s}"
            sampling = SamplingParams(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                                      max_new_tokens=g.max_new_tokens,
                                      seed=request_seed(cfg.seed, iteration, i * k + s))
            requests.append(GenRequest(rid, list(prompt.token_ids), sampling, group=f"{iteration}:{i}",
                                       history=earlier))
            owners[rid] = (prompt, s)
    return requests, owners


def eval_requests(cfg: Config, eval_prompts: list[Prompt]) -> list:
    """The held-out prompts, greedy then one sample each with seeds fixed across evaluations. No request group and
    no history: an evaluation drafts from its own text only, and its outputs never feed the history."""
    g = cfg.generation
    greedy = SamplingParams(temperature=0.0, max_new_tokens=g.max_new_tokens, seed=0)
    requests = [GenRequest(f"eval:{i}", list(p.token_ids), greedy) for i, p in enumerate(eval_prompts)]
    requests += [GenRequest(f"eval-sampled:{i}", list(p.token_ids),
                            SamplingParams(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                                           max_new_tokens=g.max_new_tokens,
                                           seed=request_seed(cfg.seed, EVAL_STREAM, i)))
                 for i, p in enumerate(eval_prompts)]
    return requests


class Driver:
    def __init__(self, cfg: Config, actors, tokenizer, sampler: PromptSampler, tracking: Tracking,
                 checkpoints: CheckpointManager, reward_moments: algo.RunningMoments,
                 eval_prompts: list[Prompt] = (), history_store=None):
        """history_store: the run's HistoryStore (rollout drafts on; `trainer/loop/run.py:train` keeps it across
        rewinds and the checkpoints save it); None with rollout drafts on makes one for this driver."""
        self.cfg, self.tokenizer, self.sampler = cfg, tokenizer, sampler
        self.fleet: RolloutFleet = actors.fleet
        self.policy, self.critic = actors.policy, actors.critic
        self.draft = actors.draft  # DraftTrainer handle, or None when the draft does not adapt online
        # "head": the draft trainer reads the old policy's features; "model": its top-k (draft.loss=kl_topk)
        self.timeout_s = cfg.trainer.call_timeout_s  # the deadline of every wait on an actor
        self.draft_kind = wait(self.draft.kind.remote(), self.timeout_s, "draft trainer") if self.draft else None
        self.weight_version = 0  # the last weight push: iterations whose updates it includes
        self.reference, self.reward = actors.reference, actors.reward  # Restartable: made again if they die
        self.restarts = getattr(actors, "restarts", None)
        self.history: list[dict] = []  # the iterations done so far (a rewind keeps those before its checkpoint)
        # earlier epochs' responses per prompt (rollout drafts), the driver's: an instance may be replaced
        self.history_store = history_store if history_store is not None else new_history_store(cfg.generation)
        self.iteration: int | None = None  # the one in progress
        self.tracking, self.checkpoints = tracking, checkpoints
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.reward_moments = reward_moments
        self.eval_prompts = list(eval_prompts)
        self._update_s: float | None = None  # the last policy + critic update's seconds
        self._found_calibration = self._cost_ratio = self._last_verdict = None  # the draft verdict's
        self._mean_prompt_len = float(np.mean([len(p.token_ids) for p in sampler.prompts])) if hasattr(
            sampler, "prompts") else 0.0

    # --- the loop ------------------------------------------------------------------------------
    def fit(self, start_iteration: int = 0) -> list[dict]:
        history = self.history
        bar = tqdm(range(start_iteration, self.cfg.trainer.iterations), desc="RLHF", unit="iter",
                   disable=not self.cfg.tracking.progress, initial=start_iteration,
                   total=self.cfg.trainer.iterations)
        for iteration in bar:
            self.iteration, times = iteration, {}
            # scored with the weights this iteration's rollout uses: row i = the policy after i updates
            evaluation = self.evaluate() if self._eval_due(iteration) else {}
            with timed(times, "iteration"):
                with timed(times, "generate"):
                    prompts = self.sampler.next_batch(self.cfg.trainer.prompts_per_iteration)
                    rollouts, gen_metrics = self.generate(prompts, iteration)
                with timed(times, "make_experience"):
                    experience, exp_metrics = self.make_experience(rollouts)
                with timed(times, "update"):
                    train_metrics = self.update(experience, iteration)
                with timed(times, "weight_sync"):
                    if not self.policy_frozen(iteration) or self.draft is not None:
                        train_metrics.update(self.sync_weights(iteration + 1))
            metrics = {"iteration": iteration, **gen_metrics, **exp_metrics, **train_metrics,
                       **{f"time/{k}": v for k, v in times.items()}, **evaluation}
            metrics.update(self.draft_verdict(metrics))
            if self.restarts is not None and self.restarts.used:
                metrics["recovery/restarts"] = self.restarts.used
            self.tracking.log(metrics, step=iteration)
            history.append(metrics)
            if self.checkpoints.due(iteration):
                self.checkpoints.save(iteration, self.sampler, self.reward_moments, self.tracking.run_id)
        self.iteration = self.cfg.trainer.iterations
        if self.eval_prompts and history:
            final = {"iteration": self.cfg.trainer.iterations, **self.evaluate()}
            self.tracking.log(final, step=self.cfg.trainer.iterations)
            history.append(final)
        return history

    def _eval_due(self, iteration: int) -> bool:
        every = self.cfg.trainer.eval_every
        return bool(self.eval_prompts) and every > 0 and iteration % every == 0

    def evaluate(self) -> dict:
        """The fixed held-out prompts, scored like the training rewards: greedy, and one sample each at the
        rollout temperature (the policy RL optimises) with seeds fixed across evaluations."""
        outputs = self.fleet.run(eval_requests(self.cfg, self.eval_prompts))  # greedy outputs first, then sampled
        self.fleet.drafting_metrics()  # the evaluation's steps stay out of the next rollout's drafting figures
        self.fleet.rollout_summaries()  # ... and out of its rollout-draft figures
        n, prompts = len(self.eval_prompts), self.eval_prompts * 2
        seqs, attn, _ = make_sequences([p.token_ids for p in prompts], [o.token_ids for o in outputs], self.pad_id)
        texts = [self.tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outputs]
        scored = self.reward.call("score", seqs, attn, prompts, texts).get()  # one batch: one error at most
        metrics = {"eval/length_mean": float(np.mean([len(o.token_ids) for o in outputs[:n]]))}
        for prefix, rows in (("eval/", slice(0, n)), ("eval/sampled_", slice(n, 2 * n))):
            metrics[prefix + "reward"] = scored.total[rows].float().mean().item()
            if scored.fn is not None:  # eval/score, eval/<key>; the same as eval/sampled_*
                metrics.update(scored.fn.select(rows).metrics(prefix, "score"))
        if scored.fn is not None:
            metrics.update(scored.fn.select(slice(0, n)).by_source([p.data_source for p in self.eval_prompts],
                                                                   "eval/"))
        return metrics

    # --- phases --------------------------------------------------------------------------------
    def generate(self, prompts: list[Prompt], iteration: int) -> tuple[list[Rollout], dict]:
        """Every prompt x sample goes out once and comes back once, spread over the instances."""
        k = self.cfg.trainer.samples_per_prompt
        requests, owners = training_requests(self.cfg, prompts, iteration, self.history_store)
        t0 = time.perf_counter()
        outputs = self.fleet.run(requests, progress=self.cfg.tracking.progress, group_size=k)
        elapsed = time.perf_counter() - t0
        orders = self.fleet.balance_log()  # every migration order with its reason, beside the run's records
        if orders:
            os.makedirs(self.cfg.trainer.output_dir, exist_ok=True)
            with open(os.path.join(self.cfg.trainer.output_dir, "balancer.log"), "a") as f:
                f.writelines(f"[iter {iteration}] {line}\n" for line in orders)
        rollouts = [Rollout(*owners[r.request_id], list(o.token_ids), o.finish_reason, dict(o.stats))
                    for r, o in zip(requests, outputs)]  # request order: GRPO groups stay contiguous
        tokens = sum(len(r.token_ids) for r in rollouts)
        stale = [r for r in rollouts if r.stats.get("weight_version", self.weight_version) != self.weight_version]
        if stale:
            raise RuntimeError(f"{len(stale)} rollouts of iteration {iteration} were decoded with weight version "
                               f"{stale[0].stats['weight_version']}, not the pushed {self.weight_version}")
        if self.history_store is not None:  # after the whole rollout: this iteration's siblings drafted live
            for r in rollouts:
                self.history_store.add(prompt_id(r.prompt), r.token_ids)
        steps = sum(r.stats.get("steps", 0) for r in rollouts)
        accepted = sum(r.stats.get("accepted", 0) for r in rollouts)
        drafted = sum(r.stats.get("drafted", 0) for r in rollouts)
        metrics = {
            "rollout/tokens_per_s": tokens / max(elapsed, 1e-9),
            "rollout/mean_accepted": accepted / max(steps, 1),  # draft tokens accepted per sample-step
            "rollout/tokens_per_step": tokens / max(steps, 1),
            "rollout/acceptance_rate": accepted / max(drafted, 1),
            "rollout/weight_version": self.weight_version,
            "rollout/draft_version": min((r.stats.get("draft_version", 0) for r in rollouts), default=0),
            "response/length_mean": tokens / max(len(rollouts), 1),
            "response/length_max": max((len(r.token_ids) for r in rollouts), default=0),
            "response/truncated_frac": float(np.mean([r.finish_reason == "length" for r in rollouts])),
            **self.fleet.balance_metrics(),  # migrations, samples moved, bytes, frozen time (balancer on)
            **self.fleet.drafting_metrics(),  # plain steps, nodes, levels, predicted vs realised acceptance
            **self.fleet.kv_metrics(),  # preemptions, prompt tokens prefilled and shared, pool occupancy
            # rollout drafts: chain tokens accepted per step by source, hit rates, index size, lookup time
            **rollout_draft_metrics(self.fleet.rollout_summaries(), steps, elapsed, len(self.fleet.alive)),
        }
        if self.history_store is not None:
            metrics.update({f"history/{key}": v for key, v in self.history_store.stats().items()})
        return rollouts, metrics

    def make_experience(self, rollouts: list[Rollout]) -> tuple[Experience, dict]:
        """Reference, old-policy, value and reward passes run at the same time on their actors."""
        t = self.cfg.trainer
        temperature = max(self.cfg.generation.temperature, 1e-6)
        seqs, attn, action_mask = make_sequences([r.prompt.token_ids for r in rollouts],
                                                 [r.token_ids for r in rollouts], self.pad_id)
        num_actions = action_mask.shape[1]
        responses_text = [self.tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in rollouts]

        ref_call = self.reference.call("logprobs", seqs, attn, num_actions, temperature)
        score_call = self.reward.call("score", seqs, attn, [r.prompt for r in rollouts], responses_text)
        # the draft trainer's data comes from the same forward as the old log-probs: a head's features, or a draft
        # model's top-k teacher
        features = self.draft_kind == "head"
        teacher_k = self.cfg.draft.top_k if self.draft_kind == "model" and self.cfg.draft.loss == "kl_topk" else 0
        if features:
            old_refs = self.policy.call_split("compute_logprobs_features", seqs, attn, num_actions)
        elif teacher_k:
            old_refs = self.policy.call_split("compute_logprobs_topk", seqs, attn, num_actions, teacher_k)
        else:
            old_refs = self.policy.call_split("compute_logprobs", seqs, attn, num_actions)
        value_refs = self.critic.call_split("values", seqs, attn, num_actions) if self.critic else None
        ref_logp = ref_call.get()
        topk_logp = topk_ids = feats = None
        old = wait(old_refs, self.timeout_s, "policy log-probs")
        if features:
            old_logp, feats = (torch.cat(parts) for parts in zip(*old))
        elif teacher_k:
            old_logp, topk_logp, topk_ids = (torch.cat(parts) for parts in zip(*old))
        else:
            old_logp = torch.cat(old)
        values = torch.cat(wait(value_refs, self.timeout_s, "critic values")) if value_refs else None
        scored = score_call.get()  # the reward actor's: RM and reward function combined, and the function's own
        scores = scored.total.float()
        raw_scores = scores.clone()

        if t.normalize_reward:
            self.reward_moments.update(scores)
            scores = self.reward_moments.normalize(scores)
        kl = algo.kl_penalty(old_logp, ref_logp, t.kl_estimator) * action_mask
        if t.algorithm == "ppo":
            kl_coef = 0.0 if t.use_kl_loss else t.kl_coef
            rewards = algo.compute_rewards(scores, kl, action_mask, kl_coef, t.reward_clip)
            advantages, returns = algo.compute_gae(rewards, values, action_mask, t.gamma, t.lam)
            advantages = algo.masked_whiten(advantages, action_mask)
        else:
            rewards = None
            adv = algo.grpo_advantages(algo.clip_reward(scores, t.reward_clip), t.samples_per_prompt,
                                       norm_std=t.grpo_norm_std)
            advantages, returns = algo.expand_to_tokens(adv, action_mask), None
        exp = Experience(sequences=seqs, attention_mask=attn, action_mask=action_mask, num_actions=num_actions,
                         old_logprobs=old_logp, ref_logprobs=ref_logp, values=values, rewards=rewards,
                         advantages=advantages, returns=returns, scores=raw_scores, topk_logprobs=topk_logp,
                         topk_ids=topk_ids, features=feats)
        metrics = {
            "reward/mean": raw_scores.mean().item(),
            "reward/std": raw_scores.std().item() if len(raw_scores) > 1 else 0.0,
            "kl/mean": (kl.sum(1) / action_mask.sum(1).clamp(min=1)).mean().item(),
            **(scored.fn.metrics("score/", "mean") if scored.fn is not None else {}),
        }
        if values is not None:
            metrics["critic/values_mean"] = algo.masked_mean(values, action_mask).item()
        return exp, metrics

    def policy_frozen(self, iteration: int) -> bool:
        """During critic warm-up only the critic learns: a fresh value head first learns the rewards' scale."""
        return self.critic is not None and iteration < self.cfg.trainer.critic_warmup

    def update(self, experience: Experience, iteration: int) -> dict:
        """Critic and policy learn at the same time, each on its data-parallel shards, and the draft trainer
        distils the draft toward the policy that made this rollout beside them, off the critical path: it is handed
        their refs and stops when they are done (the rest of its step budget carries over)."""
        start = time.perf_counter()
        draft_batch = experience
        # only the draft reads the teacher and the features
        experience = replace(experience, topk_logprobs=None, topk_ids=None, features=None)
        policy_refs = [] if self.policy_frozen(iteration) else self.policy.call_sharded("update", experience, iteration)
        critic_refs = self.critic.call_sharded("update", experience, iteration) if self.critic else []
        draft_ref = None
        if self.draft is not None:
            window = None if self.cfg.draft.full_budget else list(policy_refs) + list(critic_refs)
            draft_ref = self.draft.train.remote(draft_batch, iteration, window, self._update_s)
        metrics = {}
        if policy_refs:
            policy_metrics = wait(policy_refs, self.timeout_s, "policy update")[0]  # already all-reduced across ranks
            metrics = {f"policy/{k}": v for k, v in policy_metrics.items()}
            metrics["loss/policy"] = policy_metrics.get("policy_loss", float("nan"))
        if critic_refs:
            critic_metrics = wait(critic_refs, self.timeout_s, "critic update")[0]
            metrics.update({f"critic/{k}": v for k, v in critic_metrics.items()})
            metrics["loss/value"] = critic_metrics.get("value_loss", float("nan"))
        updated = time.perf_counter()
        metrics["time/policy_update"] = updated - start  # policy and critic, side by side
        if policy_refs or critic_refs:
            self._update_s = updated - start  # the next iteration's draft deadline
        if draft_ref is not None:
            draft_metrics = wait(draft_ref, self.timeout_s, "draft trainer update")
            metrics["time/draft_wait"] = time.perf_counter() - updated  # ~0: the draft stops with the updates
            metrics.update({f"draft/{k}": v for k, v in draft_metrics.items()})
        return metrics

    def draft_verdict(self, metrics: dict) -> dict:
        """Whether drafting can pay at the acceptance measured this iteration (the draft trainer's, on the rollout
        before it trained on it; else the rollout's accepted per drafted token), as `draft/verdict_*` metrics; the
        console line comes at the first verdict and whenever it turns."""
        from drafting.policy.verdict import judge

        acceptance = metrics.get("draft/acceptance")
        if acceptance is None and metrics.get("rollout/acceptance_rate"):
            acceptance = metrics["rollout/acceptance_rate"]
        if acceptance is None or self.cfg.generation.strategy == "none" or self.cfg.model.draft is None:
            return {}  # (no draft model: rollout drafts alone, nothing for a draft verdict to judge)
        g, t = self.cfg.generation, self.cfg.trainer
        live = metrics.get("drafting/live_mean") or t.prompts_per_iteration * t.samples_per_prompt / g.num_instances
        ctx = self._mean_prompt_len + metrics.get("response/length_mean", 0.0) / 2
        cal = self._calibration()
        verdict = judge(acceptance, cal, live=round(live), ctx=round(ctx), cost_ratio=self._cost_ratio)
        if self._last_verdict is None or verdict.pays != self._last_verdict:
            tqdm.write(verdict.line())
        self._last_verdict = verdict.pays
        return verdict.metrics()

    def _calibration(self):
        """The step-time calibration of this actor and draft here, once the instances have one (read, never
        profiled: `auto` profiles on first use only where a strategy needs it). Also the draft's cost per token
        over the actor's, for the bound without one."""
        if self._found_calibration is None and self.cfg.generation.gpus_per_instance == 0:
            from transformers import AutoConfig

            from drafting.model.head import draft_config
            from drafting.policy.verdict import find_calibration, forward_cost
            from trainer.loop.preflight import resolve_paths

            paths = resolve_paths(self.cfg)
            if self._cost_ratio is None:
                actor = AutoConfig.from_pretrained(paths.actor)
                self._cost_ratio = forward_cost(draft_config(paths.draft, actor)) / forward_cost(actor)
            self._found_calibration = find_calibration(paths.actor, paths.draft, self.cfg.model.dtype, "cpu",
                                                       self.cfg.generation.threads_per_instance,
                                                       self.cfg.generation.calibration)
        return self._found_calibration

    def sync_weights(self, version: int = 0) -> dict:
        """Trainer rank 0 broadcasts every actor parameter to every generation instance, the draft trainer the
        draft's right after on the same group; `version` = the iterations whose updates the weights include."""
        seconds = self.fleet.sync_weights_from(self.policy, version, self.draft)
        self.weight_version = version
        return {"time/draft_sync": seconds["draft_s"]} if self.draft is not None else {}

