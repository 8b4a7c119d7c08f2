"""Write the tiny task's prompts as Verl writes GSM8K (`examples/data_preprocess/gsm8k.py`): Parquet rows with
data_source, prompt (chat messages), ability, reward_model {style, ground_truth} and extra_info.

    python -m trainer.tiny.make_verl_data --out ~/data/tiny_verl    # -> train.parquet, test.parquet

`configs/tiny_verl.yaml` trains on them with the reward given as a Python file.
"""
from __future__ import annotations

import argparse
from pathlib import Path

DATA_SOURCE = "tiny/sort"


def verl_rows(rows: list[dict], split: str) -> list[dict]:
    """Verl's row layout for tiny-task rows {"prompt", "answer"}."""
    return [{"data_source": DATA_SOURCE,
             "prompt": [{"role": "user", "content": row["prompt"]}],
             "ability": "sort",
             "reward_model": {"style": "rule", "ground_truth": row["answer"]},
             "extra_info": {"split": split, "index": i}}
            for i, row in enumerate(rows)]


def write_verl_data(out: str | Path) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trainer.tiny import task
    from trainer.tiny.bootstrap import ensure_tiny_world

    world = ensure_tiny_world()
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for split, source in (("train", world.train_prompts), ("test", world.eval_prompts)):
        path = out / f"{split}.parquet"
        pq.write_table(pa.Table.from_pylist(verl_rows(task.read_prompts_jsonl(source), split)), path)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="~/data/tiny_verl", help="output directory (default: %(default)s)")
    for path in write_verl_data(parser.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
