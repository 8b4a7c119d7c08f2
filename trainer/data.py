"""Prompt data: JSONL or Parquet in, tokenized prompts out, in a seeded order a checkpoint can resume."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """Bad prompt data; the message names the file and the problem."""


@dataclass
class Prompt:
    index: int  # row number in the source file: stable across shuffles and restarts
    text: str  # the prompt as the model sees it (chat template already applied)
    token_ids: list[int]


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a .jsonl/.json-lines or .parquet file as dicts."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prompt file not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        with path.open() as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
        return rows
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise DataError(f"{path}: unsupported prompt file type {suffix!r} (use .jsonl or .parquet)")


def render_prompt(row: dict, tokenizer, prompt_key: str, messages_key: str, path) -> str:
    """A row's prompt text: the `prompt` column, or `messages` through the tokenizer's chat template."""
    if prompt_key in row and row[prompt_key] is not None:
        return str(row[prompt_key])
    if messages_key in row and row[messages_key] is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{path}: column {messages_key!r} needs a tokenizer with a chat template")
        return tokenizer.apply_chat_template(row[messages_key], tokenize=False, add_generation_prompt=True)
    raise DataError(f"{path}: row has neither a {prompt_key!r} nor a {messages_key!r} column "
                    f"(columns: {', '.join(sorted(row))})")


def load_prompts(path, tokenizer, max_prompt_len: int, prompt_key="prompt", messages_key="messages",
                 overlong="filter") -> list[Prompt]:
    """Tokenize every row; drop (or cut, keeping the end) prompts longer than max_prompt_len tokens."""
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: no prompts in file")
    prompts = []
    for i, row in enumerate(rows):
        text = render_prompt(row, tokenizer, prompt_key, messages_key, path)
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) > max_prompt_len:
            if overlong == "filter":
                continue
            ids = ids[-max_prompt_len:]  # the end of a prompt holds the question
        prompts.append(Prompt(index=i, text=text, token_ids=ids))
    if not prompts:
        raise DataError(f"{path}: all {len(rows)} prompts are longer than max_prompt_len={max_prompt_len}")
    return prompts


class PromptSampler:
    """Endless seeded epochs over the prompts; `state()`/`load_state()` make resume exact."""

    def __init__(self, prompts: list[Prompt], seed: int, shuffle: bool = True):
        self.prompts, self.seed, self.shuffle = prompts, seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.prompts))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))

    def next_batch(self, n: int) -> list[Prompt]:
        batch = []
        while len(batch) < n:
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            batch.append(self.prompts[self._order[self.cursor]])
            self.cursor += 1
        return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "size": len(self.prompts)}

    def load_state(self, state: dict) -> None:
        if state["size"] != len(self.prompts) or state["seed"] != self.seed:
            raise DataError(f"data cursor does not match this dataset (saved size {state['size']}, "
                            f"seed {state['seed']}; now {len(self.prompts)}, {self.seed})")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._epoch_order(self.epoch)
