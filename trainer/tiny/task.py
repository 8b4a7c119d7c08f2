"""The tiny world's verifiable task: sort (or reverse) a list of digits.

Lengths are geometric (p=0.1, clipped to 1..64), so response lengths are long-tailed like real RLHF
rollouts: most answers are short, a few are very long. The training reward is `trainer/tiny/reward.py`.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

# The prompt's first word names the operation, so the score needs nothing but the prompt.
OPS = {"sort": sorted, "reverse": lambda words: list(reversed(words))}
TASK_WORD = "sort"  # the operation make_example asks for
DIGITS = [str(d) for d in range(10)]
WORDS = list(OPS) + [":", "="]
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]  # ids 0..3, in this order
LENGTH_P = 0.1
MAX_LEN = 64


def sample_length(rng: random.Random, p: float = LENGTH_P, max_len: int = MAX_LEN) -> int:
    """Geometric length on 1, 2, ... (mean 1/p), clipped to max_len: the long tail of rollouts."""
    u = 1.0 - rng.random()  # (0, 1]
    return min(max_len, 1 + int(math.log(u) / math.log(1.0 - p)))


def make_prompt(digits: list[str], op: str = TASK_WORD) -> str:
    return f"{op} : {' '.join(digits)} ="


def make_example(rng: random.Random) -> dict:
    """One example: {"prompt": "sort : 3 1 4 =", "answer": "1 3 4"}."""
    digits = [rng.choice(DIGITS) for _ in range(sample_length(rng))]
    return {"prompt": make_prompt(digits), "answer": " ".join(OPS[TASK_WORD](digits))}


def parse_prompt(prompt: str) -> tuple[str, list[str]]:
    """The operation and digits of a prompt; a malformed prompt is a ValueError that quotes it."""
    words = prompt.split()
    if len(words) < 3 or words[0] not in OPS or words[1] != ":" or words[-1] != "=":
        raise ValueError(f"prompt is not of the form '<{'|'.join(OPS)}> : d1 ... dn =': {prompt!r}")
    digits = words[2:-1]
    bad = [w for w in digits if w not in DIGITS]
    if bad:
        raise ValueError(f"prompt has non-digit words {bad}: {prompt!r}")
    return words[0], digits


def target_of(prompt: str) -> list[str]:
    """The exact answer's words, from the prompt alone."""
    op, digits = parse_prompt(prompt)
    return OPS[op](digits)


def _response_words(response: str) -> list[str]:
    # Special tokens left in by a decoder without skip_special_tokens carry no answer content.
    return [w for w in response.split() if w not in SPECIAL_TOKENS]


def is_exact(prompt: str, response: str) -> bool:
    return _response_words(response) == target_of(prompt)


def score(prompt: str, response: str) -> float:
    """The score of a response to a prompt (the answer follows from the prompt)."""
    return answer_score(response, " ".join(target_of(prompt)))


def answer_score(response: str, answer: str) -> float:
    """1.0 for the exact answer; else 0.5 * fraction of correct positions (over the longer of the two)."""
    target, words = answer.split(), _response_words(response)
    if words == target:
        return 1.0
    correct = sum(a == b for a, b in zip(words, target))
    return 0.5 * correct / max(len(words), len(target))


def write_prompts_jsonl(path: str | Path, n: int, seed: int) -> Path:
    """Write n examples as JSONL rows {"prompt", "answer"}; the same seed gives the same file."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps(make_example(rng)) + "\n")
    return path


def read_prompts_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for i, line in enumerate(f):
            if line.strip():
                row = json.loads(line)
                if "prompt" not in row:
                    raise ValueError(f"{path}:{i + 1}: row has no 'prompt' field")
                rows.append(row)
    return rows
