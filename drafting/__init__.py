"""Speculative generation engine (no Ray inside): lean decoders, sample slots, draft trees, one-pass tree
verification, lossless acceptance. Layers, bottom up: `model`, `spec`, `policy`, `runtime`, `calibrate` (each
sub-package says what it holds and may import); `SpeculativeEngine` is the runtime's engine with
`calibration='auto'` resolved by calibrate's first use."""
from drafting.calibrate.first_use import SpeculativeEngine
from drafting.policy.strategy import DraftStrategy, parse_strategy
from drafting.records import EngineStats, GenOutput, GenRequest, KVRange, SampleState, SamplingParams

__all__ = ["SpeculativeEngine", "SamplingParams", "GenRequest", "GenOutput", "SampleState", "KVRange",
           "EngineStats", "DraftStrategy", "parse_strategy"]
