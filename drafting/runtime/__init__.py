"""The engine a caller holds: the public API (add, step, remove, export/import a sample), the step that runs the
spec stages under a policy, slots and admission in terms of samples and tokens held, the K/V cache, and graph
running keyed by typed stage keys.

May import: `drafting.model`, `drafting.spec`, `drafting.policy`, `drafting.records`. Never the profiler: a
calibration comes in as an object, a path or a resolver (`drafting.calibrate` resolves 'auto')."""
