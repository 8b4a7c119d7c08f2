"""DraftTrainer: a Ray actor that distils the draft toward the actor on each rollout, while the policy and
critic update, and sends the draft's weights on the weight-sync group (rank 1, see actors/weight_sync.py).

It never holds the loop: `draft.steps` is a budget, and the trainer stops between optimizer steps once the
policy and critic updates it was handed are done (or its next step would end after the last iteration's update
time). The steps it did not get to carry over to the next iteration, up to one budget.

The draft is a model (an HF causal LM, trainer/distill.py) or an EAGLE-style head (its directory,
trainer/head_online.py): a head learns from the old policy's features and borrows the actor's current embedding
and LM head, which it keeps from the actor's weight pushes (`drop_broadcast`).

Plain torch, not DeepSpeed: a draft is small (1 layer here, about 1B parameters beside an 8B actor), so one
device holds it with its AdamW states; ZeRO sharding or data parallelism would buy nothing, and a second
DeepSpeed process group would only add start-up time and a rendezvous. The training loop is trainer/distill.py.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import ray
import torch

from actors.trainer_group import quiet_deepspeed
from actors.weight_sync import WeightSender, receive_broadcast
from configs.schema import DraftConfig
from drafting.model.head import draft_kind
from trainer.draft.distill import DraftLearner
from trainer.core.experience import Experience
from trainer.draft.head_online import HeadOnline
from trainer.core.deepspeed_backend import load_causal_lm

STATE_FILE = "draft_trainer.pt"


class DraftTrainer(WeightSender):
    def __init__(self, draft_path: str, cfg: DraftConfig, temperature: float, seed: int = 0, device: str = "cpu",
                 threads: int = 1, actor_path: str | None = None):
        """actor_path: the actor a head borrows its embedding, LM head and rotary from (a head only)."""
        torch.set_num_threads(threads)
        quiet_deepspeed()  # the draft's optimizer may reach DeepSpeed's accelerator in an iteration: not its line
        self.device = torch.device(device)
        self.seed, self.cfg = seed, cfg
        self.draft_kind = draft_kind(draft_path)
        if self.draft_kind == "head":
            if actor_path is None:
                raise ValueError(f"draft trainer: {draft_path} is a draft head; it needs the actor's path")
            self.learner = HeadOnline(draft_path, actor_path, cfg, temperature, self.device)
        else:
            self.learner = DraftLearner(load_causal_lm(draft_path, "draft").to(self.device), cfg, temperature)
        self.carried = 0  # budgeted steps the last iteration did not get to
        self.step_s = 0.0  # a step's seconds, running mean: no step starts that would end past the deadline

    def ready(self) -> bool:
        return True

    def kind(self) -> str:
        """'head' (it learns from the old policy's features) or 'model' (from its top-k log-probs)."""
        return self.draft_kind

    def train(self, experience: Experience, iteration: int, updates: list | None = None,
              deadline_s: float | None = None) -> dict[str, float]:
        """Distil on this rollout. `updates`: the policy and critic update refs (in a list, so Ray hands them over
        unresolved); training stops when they are all done or the next step would end after `deadline_s`, at
        least one step done. None: the whole budget. The minibatch order is seeded by (seed, iteration)."""
        start = time.perf_counter()
        seed = int(np.random.SeedSequence([self.seed, iteration]).generate_state(1, np.uint64)[0] >> 1)
        budget = self.cfg.steps + self.carried
        clock = {"last": start, "steps": 0}

        def should_stop() -> bool:
            now = time.perf_counter()
            if clock["steps"]:  # the step that just ended: its time feeds the estimate
                took = now - clock["last"]
                self.step_s = took if not self.step_s else 0.7 * self.step_s + 0.3 * took
            clock["last"], clock["steps"] = now, clock["steps"] + 1
            if updates is None or clock["steps"] == 1:
                return False
            if deadline_s is not None and now - start + self.step_s > deadline_s:
                return True
            return not ray.wait(updates, num_returns=len(updates), timeout=0, fetch_local=False)[1] if updates else True

        metrics = self.learner.train(experience.to(self.device), seed, steps=budget, should_stop=should_stop)
        self.carried = min(budget - int(metrics["steps"]), self.cfg.steps)
        metrics.update({"budget": float(budget), "carried": float(self.carried), "step_seconds": self.step_s,
                        "seconds": time.perf_counter() - start})
        return metrics

    def sync_tensors(self):
        """The draft's parameters by name: a model's HF names, or a head's fc.* and layer.* (what `HeadDecoder`
        loads; the embedding and LM head are the actor's, already on the instances)."""
        return ((name, p.detach()) for name, p in self.learner.model.named_parameters())

    def drop_broadcast(self, specs: list[tuple[str, tuple, str]], src: int) -> int:
        """Take part in the actor's broadcast; a head keeps the actor's embedding and LM head from it (the ones
        that computed the next rollout's features, trainer/head_online.py), a model drops everything."""
        if self.draft_kind != "head":
            return super().drop_broadcast(specs, src)
        for spec in specs:
            for name, tensor in receive_broadcast(self._weight_group, [spec], src).items():
                self.learner.load_actor_tensor(name, tensor)
        return len(specs)

    def save_checkpoint(self, ckpt_dir: str) -> bool:
        """The draft's weights and AdamW states, plus the draft itself in `hf/` (loadable as model.draft: an HF
        model, or a head directory)."""
        path = Path(ckpt_dir)
        path.mkdir(parents=True, exist_ok=True)
        torch.save({**self.learner.state_dict(), "carried": self.carried}, path / STATE_FILE)
        model = self.learner.model
        (model.save if self.draft_kind == "head" else model.save_pretrained)(path / "hf")
        return True

    def load_checkpoint(self, ckpt_dir: str) -> bool:
        state_file = Path(ckpt_dir) / STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"draft.online: the checkpoint has no draft trainer state ({state_file}); "
                                    "it was saved with draft.online=false")
        state = torch.load(state_file, map_location=self.device, weights_only=True)
        self.learner.load_state_dict(state)
        self.carried = int(state.get("carried", 0))
        self.step_s = 0.0  # a step's time is measured anew, as in a new process
        return True
