"""Fitting a draft to the actor: the distillation loss and learner, the EAGLE-style head's learner, the actor as a
teacher (samples, distributions, features), online training during RL, and the offline CLI
(`python -m trainer.distill_draft`). May import `trainer.core` and `drafting`; not Ray, not `trainer.loop`."""
