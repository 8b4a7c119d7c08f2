"""The tiny world: the embedded default's task, models and bootstrap, built offline on 2 CPU cores.

It is one user of the project's public interfaces (prompt files, a reward function, HF model paths),
kept apart so that `trainer/` shows the RL parts at a glance."""
