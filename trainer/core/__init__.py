"""The algorithm and the model work it needs: PPO/GRPO maths, experience batches and forwards, reward functions,
and the DeepSpeed backend. Runs in any process: imports neither Ray nor `actors`, nor `trainer.loop`."""
