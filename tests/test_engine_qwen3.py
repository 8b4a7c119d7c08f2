"""Qwen3 in the lean engine: per-head q/k RMSNorm before RoPE. Logits == HF, and greedy output of every
strategy == HF greedy generate, on a tiny random Qwen3 pair (as tests/test_engine.py does for Llama and Qwen2)."""
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from drafting import SamplingParams, SpeculativeEngine
from drafting.kv_store import KVCache
from drafting.model import LeanDecoder
from test_engine import PROMPTS, STRATEGIES, V, hf_greedy

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_qwen3(layers: int, hidden: int, seed: int) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits the q/k norms to ones: make them matter
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def pair():
    return tiny_qwen3(2, 64, seed=0), tiny_qwen3(1, 32, seed=1)


def test_lean_forward_matches_hf_logits(pair):
    model = pair[0]
    lean = LeanDecoder(model, "cpu", torch.float32, max_positions=64, max_len=64)
    assert lean.layers[0]["q_norm"] is not None
    ids = torch.randint(0, V, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    T = ids.shape[1]
    cache = KVCache(2, 3, 2, 64, 16, "cpu", torch.float32)
    pos = torch.arange(T).expand(3, T)
    out, _ = lean.forward(ids, pos, torch.ones(T, T, dtype=torch.bool).tril().expand(3, T, T), cache,
                          slice(0, 3), T, write_pos=pos)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_greedy_equals_hf_generate(pair, strategy):
    target, draft = pair
    ref = hf_greedy(target, PROMPTS, 12)
    eng = SpeculativeEngine(target, draft, strategy=strategy, max_slots=3, max_len=48)
    outs = eng.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=12))
    assert [o.token_ids for o in outs] == ref
