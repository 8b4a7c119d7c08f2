"""Two source trees, one benchmark, alternating subprocesses in one run: does a change keep the speed?

    python -m bench.ab --a /path/to/old/checkout --b . --repeats 3 --out bench/results/ab_rollout.json \
        -- python -m bench.rollout --quick --skip schemes,flips,noise

Each repeat runs the benchmark once in tree A, then once in tree B (B first on odd repeats), each writing its own
JSON; rows (`rows` of `bench.rollout`'s JSON: phase x name) are matched by (phase, name) and their tokens/s
compared as medians over the repeats, B / A. This machine is noisy (+-20% run to run): alternating spreads the
drift over both trees, and the medians with their spread are what to read."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(tree: Path, command: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    subprocess.run(command + ["--out", str(out)], cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    result["_seconds"] = time.perf_counter() - t0
    return result


def rows_by_key(result: dict) -> dict[tuple, float]:
    return {(r["phase"], r["name"]): r["tokens_per_s"] for r in result.get("rows", []) if "tokens_per_s" in r}


def compare(runs: dict[str, list[dict]]) -> list[dict]:
    """Per row: the median tokens/s of each tree, their ratio (b / a), and every repeat's figure."""
    keys = sorted(set.intersection(*(set(rows_by_key(r)) for rs in runs.values() for r in rs)))
    out = []
    for key in keys:
        a = [rows_by_key(r)[key] for r in runs["a"]]
        b = [rows_by_key(r)[key] for r in runs["b"]]
        out.append({"phase": key[0], "name": key[1], "a_tokens_per_s": statistics.median(a),
                    "b_tokens_per_s": statistics.median(b), "ratio": statistics.median(b) / statistics.median(a),
                    "a_runs": a, "b_runs": b})
    return out


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="tree A (the baseline)")
    ap.add_argument("--b", default=".", help="tree B (the change)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if not command:
        ap.error("give the benchmark command after --")
    trees = {"a": Path(args.a).resolve(), "b": Path(args.b).resolve()}
    runs: dict[str, list[dict]] = {"a": [], "b": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for side in ("a", "b") if rep % 2 == 0 else ("b", "a"):
                res = run_once(trees[side], command, Path(tmp) / f"{side}{rep}.json")
                runs[side].append(res)
                print(f"repeat {rep} tree {side}: {res['_seconds']:.0f} s", flush=True)
    rows = compare(runs)
    for r in rows:
        print(f"{r['phase']:<8} {r['name']:<14} A {r['a_tokens_per_s']:7.1f}  B {r['b_tokens_per_s']:7.1f}  "
              f"B/A {r['ratio']:.3f}  (A {', '.join(f'{x:.0f}' for x in r['a_runs'])}; "
              f"B {', '.join(f'{x:.0f}' for x in r['b_runs'])})")
    result = {"command": command, "trees": {k: str(v) for k, v in trees.items()}, "repeats": args.repeats,
              "rows": rows, "seconds": {k: [r["_seconds"] for r in v] for k, v in runs.items()},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
