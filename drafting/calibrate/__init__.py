"""Calibration: the profile run (forced steps over a grid of live samples, contexts and step shapes), first use
inside a run (profile once, with a fallback strategy meanwhile), and the CLI (`python -m drafting.profile`).

Sits above the runtime: may import every other layer of `drafting`. Only the CLI (`cli.py`) reads run configs."""
