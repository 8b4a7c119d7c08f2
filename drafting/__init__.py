"""Speculative generation engine (no Ray inside): lean decoders, per-sample KV slots, draft trees,
one-pass tree verification, lossless acceptance."""
from drafting.runtime.engine import SpeculativeEngine
from drafting.records import EngineStats, GenOutput, GenRequest, KVRange, SampleState, SamplingParams
from drafting.policy.strategy import DraftStrategy, parse_strategy

__all__ = ["SpeculativeEngine", "SamplingParams", "GenRequest", "GenOutput", "SampleState", "KVRange",
           "EngineStats", "DraftStrategy", "parse_strategy"]
