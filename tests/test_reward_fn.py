"""Reward functions as Python files with Verl's signature: loading, scoring, and one-line errors naming the
function, the sample (file and row) and the cause."""
import textwrap

import pytest

from trainer.loop.data import Prompt
from trainer.core.reward_fn import RewardFnError, dry_run, load_reward_fn, score_samples
from trainer.tiny.reward import compute_score


def reward_file(tmp_path, body: str, name: str = "my_reward.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def prompts(*answers):
    return [Prompt(i, "q", [1], "data/train.parquet", "src", answer, {"index": i}) for i, answer in enumerate(answers)]


def test_tiny_reward_is_a_verl_reward_function():
    assert compute_score("tiny/sort", "1 3 4", "1 3 4", {}) == {"score": 1.0, "exact": 1.0}
    assert compute_score("tiny/sort", "1 3 9 <eos>", "1 3 4") == {"score": 0.5 * 2 / 3, "exact": 0.0}
    assert load_reward_fn("trainer/tiny/reward.py") is not None  # ":compute_score" is Verl's default name


def test_scores_extra_keys_and_metrics(tmp_path):
    path = reward_file(tmp_path, """
        from dataclasses import dataclass

        @dataclass
        class Parsed:  # a dataclass in the file: the module is registered while it runs
            text: str

        def compute_score(data_source, solution_str, ground_truth, extra_info=None):
            right = Parsed(solution_str).text == ground_truth
            if extra_info["index"] == 0:
                return float(right)
            return {"score": float(right), "acc": right, "pred": solution_str, "index": extra_info["index"]}
    """)
    fn = load_reward_fn(f"{path}:compute_score")
    out = score_samples(fn, prompts("a", "b", "c"), ["a", "x", "c"])
    assert out.scores == [1.0, 0.0, 1.0]
    assert out.extra == {"acc": [None, 0.0, 1.0], "index": [None, 1.0, 2.0]}  # the string `pred` is not a metric
    assert out.metrics("score/", "mean") == {"score/mean": 2 / 3, "score/acc": 0.5, "score/index": 1.5}
    assert out.select(slice(1, 3)).metrics("eval/", "score") == {"eval/score": 0.5, "eval/acc": 0.5,
                                                                  "eval/index": 1.5}
    assert out.select(slice(0, 1)).metrics("eval/", "score") == {"eval/score": 1.0}
    assert out.by_source(["s1", "s2", "s1"], "eval/") == {"eval/s1/score": 1.0, "eval/s2/score": 0.0}


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(RewardFnError, match=r"^trainer.reward_fn: file not found: .*nope.py$"):
        load_reward_fn(f"{tmp_path}/nope.py:compute_score")
    path = reward_file(tmp_path, "def compute_score(**kw):\n    return 0.0\n\ndef other(**kw):\n    return 1.0\n")
    with pytest.raises(RewardFnError) as err:
        load_reward_fn(f"{path}:score")
    assert str(err.value) == f"trainer.reward_fn: {path} has no function 'score' (functions: compute_score, other)"
    broken = reward_file(tmp_path, "def compute_score(:\n", "broken.py")
    with pytest.raises(RewardFnError, match=rf"^trainer.reward_fn: cannot import {broken}: SyntaxError: "):
        load_reward_fn(str(broken))


@pytest.mark.parametrize("body, message", [
    ("raise KeyError('answer')", "raised on sample 1 (data/train.parquet row 1): KeyError: 'answer'"),
    ("return 'high'", "returned 'high' (str) on sample 0 (data/train.parquet row 0); expected a finite float or "
                      "a dict with a 'score' key"),
    ("return float('nan')", "returned nan (float) on sample 0"),
    ("return {'acc': 1.0}", "returned a dict without a 'score' key on sample 0 (data/train.parquet row 0) (keys: acc)"),
    ("return {'score': None}", "returned None (NoneType) on sample 0"),
])
def test_bad_scores_name_the_sample(tmp_path, body, message):
    path = reward_file(tmp_path, f"""
        def compute_score(data_source, solution_str, ground_truth, extra_info=None):
            if extra_info["index"] == 0 and {"raise" in body}:
                return 0.0
            {body}
    """)
    with pytest.raises(RewardFnError) as err:
        score_samples(load_reward_fn(str(path)), prompts("a", "b"), ["a", "b"])
    assert str(err.value).startswith(f"{path}:compute_score {message}")


def test_dry_run_scores_the_ground_truth(tmp_path):
    assert dry_run("trainer/tiny/reward.py:compute_score", prompts("1 2", "3")).endswith(
        "the ground truth as the response scores 1.000 on 2 prompts")
    path = reward_file(tmp_path, """
        def compute_score(data_source, solution_str, ground_truth, extra_info=None):
            return float(solution_str.split("####")[1])
    """)
    with pytest.raises(RewardFnError) as err:
        dry_run(str(path), prompts("7"))
    assert str(err.value) == (f"{path}:compute_score raised on sample 0 (data/train.parquet row 0): IndexError: "
                              "list index out of range (dry run at start-up: the ground truth as the response)")
