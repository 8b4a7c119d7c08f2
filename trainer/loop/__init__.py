"""The run: preflight, Ray set-up, the actors, the driver's iteration, the rollout fleet, checkpoints, tracking,
prompt data and a clean stop. The only layer of `trainer` that knows Ray and `actors`."""
