"""Metrics fan-out (verl's `Tracking`): one console line per iteration plus a W&B run."""
from __future__ import annotations

import os
import sys

from tqdm import tqdm

CONSOLE = {"eval/score": "eval_score", "eval/exact": "eval_exact", "score/mean": "score", "reward/mean": "reward",
           "kl/mean": "kl", "loss/policy": "pg_loss", "loss/value": "v_loss", "response/length_mean": "len",
           "rollout/tokens_per_s": "gen_tok/s", "rollout/mean_accepted": "acc/step",
           "rollout/chain_tokens_per_step": "chain/step", "draft/loss": "draft_loss", "time/iteration": "s/iter",
           "time/generate": "gen_s", "time/make_experience": "exp_s", "time/update": "upd_s",
           "time/weight_sync": "sync_s"}


class Tracking:
    def __init__(self, project: str, run_name: str | None, config: dict, use_wandb: bool, mode: str,
                 log_dir: str, resume_id: str | None = None):
        self.run = None
        self.logged: int | None = None  # the last step logged
        if use_wandb and mode != "disabled":
            import wandb

            os.makedirs(log_dir, exist_ok=True)
            self.run = wandb.init(project=project, name=run_name, config=config, mode=mode, dir=log_dir,
                                  id=resume_id, resume="allow" if resume_id else None,
                                  settings=wandb.Settings(console="off", silent=True))
            where = self.run.url if mode == "online" else os.path.dirname(self.run.dir)
            print(f"W&B run ({mode}): {where}", flush=True)  # its one line

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run else None

    @property
    def run_dir(self) -> str | None:
        return self.run.dir if self.run else None

    def log(self, metrics: dict, step: int) -> None:
        """A step redone after a rewind (its metrics equal the first time's: resume is exact) goes to the console
        only, marked: W&B refuses steps at or below its last one, and each iteration shows there once."""
        redone = self.logged is not None and step <= self.logged
        if self.run and not redone:
            self.run.log(metrics, step=step)
        self.logged = step if self.logged is None else max(self.logged, step)
        shown = " ".join(f"{label}={metrics[key]:.4g}" for key, label in CONSOLE.items() if key in metrics)
        tqdm.write(f"[iter {step}] {shown}" + (" (redone)" if redone else ""))  # above the progress bars
        sys.stdout.flush()

    def finish(self) -> None:
        if self.run:
            self.run.finish()


def read_wandb_history(run_file: str) -> list[dict]:
    """The `history` rows of a W&B run file (`run-*.wandb`), to check what a run recorded offline.

    The file is a LevelDB-style log of `Record` protobufs: a 7-byte header, then 32 KiB blocks of
    chunks, each `crc32 (4) | length (2) | type (1) | data`, type 1 = whole, 2/3/4 = first/middle/last.
    """
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = open(run_file, "rb").read()
    if data[:4] != b":W&B":
        raise ValueError(f"{run_file}: not a W&B run file")
    pos, block, rows, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows
