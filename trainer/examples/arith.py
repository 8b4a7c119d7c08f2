"""An arithmetic word-problem task in Verl's GSM8K layout, for a small pretrained chat model.

    python -m trainer.examples.arith --out ~/data/arith     # -> train.parquet (400), test.parquet (32)

The reward file is this module: `trainer.reward_fn: trainer/examples/arith.py:compute_score`.
"""
from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path

DATA_SOURCE = "arith/word"
NAMES = ["Tom", "Ana", "Li", "Sam", "Maya", "Omar", "Eva", "Raj", "Zoe", "Ben"]
THINGS = ["apples", "books", "coins", "marbles", "stickers", "pencils", "cards", "shells"]
INSTRUCTION = " End with the answer as a number."


def problem(rng: random.Random) -> tuple[str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 40), rng.randint(2, 30)
    kind = rng.choice(["add", "sub", "mul"])
    if kind == "add":
        return f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?", a + b
    if kind == "sub":
        a, b = max(a, b), min(a, b)
        return f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?", a - b
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    return f"{name} buys {a} bags with {b} {thing} in each bag. How many {thing} is that in total?", a * b


def rows(n: int, split: str, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        question, answer = problem(rng)
        out.append({"data_source": DATA_SOURCE,
                    "prompt": [{"role": "user", "content": question + INSTRUCTION}],
                    "ability": "math",
                    "reward_model": {"style": "rule", "ground_truth": str(answer)},
                    "extra_info": {"split": split, "index": i}})
    return out


def write(out: str | Path, train: int = 400, test: int = 32, seed: int = 0) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, n, s in (("train", train, seed), ("test", test, seed + 1)):
        path = out / f"{split}.parquet"
        pq.write_table(pa.Table.from_pylist(rows(n, split, s)), path)
        paths.append(path)
    return paths


NUMBER = re.compile(r"-?\d+")


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """1.0 when the last number in the response is the answer (the model may show its working first);
    `format` 1.0 when the response has a number at all."""
    numbers = NUMBER.findall(solution_str or "")
    return {"score": float(bool(numbers) and numbers[-1] == str(ground_truth)), "format": float(bool(numbers))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="~/data/arith", help="directory for train.parquet and test.parquet")
    parser.add_argument("--train", type=int, default=400, help="training problems")
    parser.add_argument("--test", type=int, default=32, help="held-out problems")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in write(args.out, args.train, args.test, args.seed):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
