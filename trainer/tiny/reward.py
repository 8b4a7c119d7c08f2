"""The tiny task's reward, as a reward file with Verl's signature: the same path a user's own reward takes
(`trainer.reward_fn: trainer/tiny/reward.py:compute_score`)."""
from trainer.tiny.task import answer_score


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """score: 1.0 for the exact answer, else 0.5 x the fraction of right positions; exact: 1.0 or 0.0."""
    score = answer_score(solution_str, ground_truth)
    return {"score": score, "exact": float(score == 1.0)}
