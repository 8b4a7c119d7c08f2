"""Prompt data: JSONL or Parquet rows in (Verl's or OpenRLHF's layout), tokenized prompts out, in a seeded
order a checkpoint can resume. Each prompt carries what the reward function needs: data_source, the ground
truth and extra_info, as Verl's reward functions expect them."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_MISSING = object()


class DataError(ValueError):
    """Bad prompt data; the message names the file, the row and the key."""


@dataclass
class Prompt:
    index: int  # row number in the source file (from 0): stable across shuffles and restarts
    text: str  # the prompt as the model sees it (chat template already applied)
    token_ids: list[int]
    source: str = ""  # the file it came from: errors name "<file> row <index>"
    data_source: str = ""  # Verl's data_source column (the file's name when absent)
    ground_truth: Any = None  # the row's value at label_key, handed to the reward function
    extra_info: dict = field(default_factory=dict)  # Verl's extra_info column

    @property
    def where(self) -> str:
        return f"{self.source} row {self.index}"


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


def lookup(row: dict, key: str):
    """row[key], where a dotted key reaches into nested columns (reward_model.ground_truth); _MISSING if absent."""
    if key in row:
        return row[key]
    value = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def render_prompt(value, tokenizer, apply_chat_template: bool, where: str, key: str) -> str:
    """A message list goes through the tokenizer's chat template; a string is the text itself (or, with
    apply_chat_template, one user message through the template)."""
    if isinstance(value, str) and apply_chat_template:
        value = [{"role": "user", "content": value}]
    elif isinstance(value, str):
        return value
    if not _is_messages(value):
        raise DataError(f"{where}: {key} holds {type(value).__name__} {repr(value)[:60]}; expected a string "
                        "or a list of {role, content} messages")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: {key} holds chat messages but the actor's tokenizer has no chat template")
    return tokenizer.apply_chat_template(value, tokenize=False, add_generation_prompt=True)


def tokenize_prompt(text: str, tokenizer) -> list[int]:
    """The tokenizer's own special tokens once: a chat template that already starts with BOS keeps one."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos:
        ids = ids[1:]
    return ids


def load_prompts(path, tokenizer, max_prompt_len: int, prompt_key: str = "prompt", label_key: str | None = None,
                 apply_chat_template: bool = False, overlong: str = "filter", size: int | None = None,
                 what: str = "data.train") -> list[Prompt]:
    """Tokenize every row; drop (or cut, keeping the end) prompts longer than max_prompt_len tokens.

    label_key given: every row must hold a ground truth there (the reward function needs one). `what` is the
    config section the keys come from, so an error names the key to change."""
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: no prompts in file")
    prompts, lengths = [], []
    for i, row in enumerate(rows):
        where = f"{path} row {i}"
        value = lookup(row, prompt_key)
        if value is _MISSING or value is None:
            raise DataError(f"{where}: no {prompt_key!r} ({what}.prompt_key; columns: {', '.join(sorted(row))})")
        text = render_prompt(value, tokenizer, apply_chat_template, where, f"{what}.prompt_key {prompt_key!r}")
        ground_truth = None
        if label_key is not None:
            ground_truth = lookup(row, label_key)
            if ground_truth is _MISSING or ground_truth is None:
                raise DataError(f"{where}: no ground truth at {what}.label_key {label_key!r}, which "
                                f"trainer.reward_fn needs (columns: {', '.join(sorted(row))})")
        data_source = row.get("data_source") or Path(path).stem
        extra_info = row.get("extra_info") or {}
        if not isinstance(data_source, str):
            raise DataError(f"{where}: data_source holds {type(data_source).__name__}; expected a string")
        if not isinstance(extra_info, dict):
            raise DataError(f"{where}: extra_info holds {type(extra_info).__name__}; expected a mapping")
        ids = tokenize_prompt(text, tokenizer)
        lengths.append(len(ids))
        if len(ids) > max_prompt_len:
            if overlong == "filter":
                continue
            ids = ids[-max_prompt_len:]  # the end of a prompt holds the question
        prompts.append(Prompt(i, text, ids, str(path), data_source, ground_truth, extra_info))
        if size is not None and len(prompts) == size:
            break
    if not prompts:
        raise DataError(f"{path}: all {len(rows)} prompts are longer than data.max_prompt_len={max_prompt_len} "
                        f"(shortest {min(lengths)}, median {int(np.median(lengths))}, longest {max(lengths)} tokens)")
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
