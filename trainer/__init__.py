"""The RLHF side, in three layers: `core` (the algorithms, experience, model forwards, reward functions and the
DeepSpeed backend: no Ray, no actors), `draft` (fitting a draft to the actor: distillation, the head learner,
online training), `loop` (the run: driver, rollout fleet, checkpoint, tracking, preflight, data, stop, Ray set-up).
`tiny/` builds the embedded default world; `examples/` bring a real model and task."""
