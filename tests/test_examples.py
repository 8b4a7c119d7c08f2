"""The real-model example's task: Verl rows that load as a user's file does, and a reward that reads the last
number of a worked answer."""
import re

from trainer.examples import arith


def test_reward_reads_the_last_number():
    assert arith.compute_score("arith/word", "3 + 2 = 5 pencils.\n\nThe answer is 5.", "5") == {"score": 1.0,
                                                                                              "format": 1.0}
    assert arith.compute_score("arith/word", "She has 18 - 5 = 12 left", "13")["score"] == 0.0
    assert arith.compute_score("arith/word", "no idea", "13") == {"score": 0.0, "format": 0.0}
    assert arith.compute_score("arith/word", "It is -4", "-4")["score"] == 1.0


def test_rows_are_verl_rows_with_checked_answers(tmp_path):
    import pyarrow.parquet as pq

    train, test = arith.write(tmp_path, train=50, test=5)
    rows = pq.read_table(train).to_pylist()
    assert len(rows) == 50 and len(pq.read_table(test)) == 5
    for row in rows:
        question = row["prompt"][0]["content"]
        a, b = (int(n) for n in re.findall(r"\d+", question))
        expected = a + b if "more" in question else a - b if "away" in question else a * b
        assert row["reward_model"]["ground_truth"] == str(expected), question
        assert row["prompt"][0]["role"] == "user" and row["data_source"] == arith.DATA_SOURCE
    assert arith.write(tmp_path / "again", train=50, test=5) and \
        pq.read_table(tmp_path / "again" / "train.parquet").to_pylist() == rows  # seeded: the same file twice
