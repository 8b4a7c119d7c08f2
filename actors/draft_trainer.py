"""DraftTrainer: a Ray actor that distils the draft toward the actor on each rollout, while the policy and
critic update, and sends the draft's weights on the weight-sync group (rank 1, see actors/weight_sync.py).

Plain torch, not DeepSpeed: a draft is small (1 layer here, about 1B parameters beside an 8B actor), so one
device holds it with its AdamW states; ZeRO sharding or data parallelism would buy nothing, and a second
DeepSpeed process group would only add start-up time and a rendezvous. The training loop is trainer/distill.py.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from actors.weight_sync import WeightSender
from configs.schema import DraftConfig
from trainer.distill import DraftLearner
from trainer.experience import Experience
from trainer.strategy import load_causal_lm

STATE_FILE = "draft_trainer.pt"


class DraftTrainer(WeightSender):
    def __init__(self, draft_path: str, cfg: DraftConfig, temperature: float, seed: int = 0, device: str = "cpu",
                 threads: int = 1):
        torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.seed = seed
        model = load_causal_lm(draft_path, "draft").to(self.device)
        self.learner = DraftLearner(model, cfg, temperature)

    def ready(self) -> bool:
        return True

    def train(self, experience: Experience, iteration: int) -> dict[str, float]:
        """Distil on this rollout; the minibatch order is seeded by (seed, iteration), so a resumed run repeats it."""
        start = time.perf_counter()
        seed = int(np.random.SeedSequence([self.seed, iteration]).generate_state(1, np.uint64)[0] >> 1)
        metrics = self.learner.train(experience.to(self.device), seed)
        metrics["seconds"] = time.perf_counter() - start
        return metrics

    def sync_tensors(self):
        return ((name, p.detach()) for name, p in self.learner.model.named_parameters())

    def save_checkpoint(self, ckpt_dir: str) -> bool:
        """The draft's weights and AdamW states, plus the draft in HF format (loadable as model.draft)."""
        path = Path(ckpt_dir)
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.learner.state_dict(), path / STATE_FILE)
        self.learner.model.save_pretrained(path / "hf")
        return True

    def load_checkpoint(self, ckpt_dir: str) -> bool:
        state_file = Path(ckpt_dir) / STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"draft.online: the checkpoint has no draft trainer state ({state_file}); "
                                    "it was saved with draft.online=false")
        self.learner.load_state_dict(torch.load(state_file, map_location=self.device, weights_only=True))
        return True
