"""The actor as a draft's teacher: its samples on a prompt file (through the engine), its next-token distributions
over them (or the features the engine kept), the layer-cut draft it starts from, and held-out acceptance."""
from __future__ import annotations

import math
import time

import torch
from tqdm import tqdm

from trainer.draft.distill import acceptance_probability
from trainer.core.experience import Experience, make_sequences, response_logits, sequence_logprobs_topk
from trainer.core.deepspeed_backend import load_causal_lm


def draft_from_actor(actor_path: str, layers: int) -> torch.nn.Module:
    """The actor's first `layers` decoder layers with its embeddings, final norm and head: a draft that shares
    the vocabulary and starts close to the actor's early representations."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(actor_path)
    if not 1 <= layers < config.num_hidden_layers:
        raise ValueError(f"--layers: {layers} must be in [1, {config.num_hidden_layers}) for this actor")
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    actor = load_causal_lm(actor_path, "actor")
    keep = {k: v for k, v in actor.state_dict().items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    draft = AutoModelForCausalLM.from_config(config)
    draft.load_state_dict(keep)
    return draft


@torch.no_grad()
def sample_outputs(actor_path: str, prompts: list[list[int]], temperature: float, max_new_tokens: int, seed: int,
                   max_len: int, deadline: float = math.inf, progress: bool = True, min_samples: int = 0,
                   features: bool = False) -> list:
    """The actor's samples with the project's engine (plain decoding: nothing to draft with yet), its outputs in
    prompt order; with `features`, each carries the actor's features [len - 1, H] (a head's feature buffer on).
    Past `deadline` (perf_counter) no new prompt starts beyond the first `min_samples`, so fewer may come back."""
    from drafting import GenRequest, SamplingParams, SpeculativeEngine
    from drafting.spec.sampling import derive_seed

    placeholder = None
    if features:
        from transformers import AutoConfig

        from drafting.model.head import DraftHead

        placeholder = DraftHead(AutoConfig.from_pretrained(actor_path))  # only switches the feature buffer on
    engine = SpeculativeEngine(actor_path, placeholder, strategy="none", max_slots=64, max_len=max_len)
    engine.keep_features = features
    for i, p in enumerate(prompts):
        engine.add(GenRequest(i, list(p), SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens,
                                                         seed=derive_seed(seed, i))))
    done = {}
    with tqdm(total=len(prompts), desc="sampling", unit="sample", disable=not progress) as bar:
        while engine.live or engine.queue:
            late = [r.request_id for r in engine.queue if r.request_id >= min_samples]
            if late and time.perf_counter() > deadline:  # the budget: no new prompt starts
                for request_id in late:
                    engine.remove(request_id)
                bar.total = len(prompts) - len(late)
                bar.refresh()
            for out in engine.step():
                done[out.request_id] = out
                bar.update(1)
    n = 0  # queued prompts leave in order: the samples that came back are a prefix of the prompts
    while n in done:
        n += 1
    return [done[i] for i in range(n)]


@torch.no_grad()
def teacher_batch(actor, prompts: list[list[int]], responses: list[list[int]], pad_id: int, temperature: float,
                  top_k: int, chunk: int = 32, desc: str = "teacher") -> Experience:
    """Sequences and masks of the samples with the actor's top-k log-probs per response position."""
    seqs, attn, action = make_sequences(prompts, responses, pad_id)
    R = action.shape[1]
    parts = [sequence_logprobs_topk(actor, seqs[i:i + chunk], attn[i:i + chunk], R, temperature, top_k)
             for i in tqdm(range(0, len(seqs), chunk), desc=desc, unit="batch", disable=desc is None)]
    _, top_logp, top_ids = (torch.cat(p) for p in zip(*parts))
    return Experience(seqs, attn, action, R, topk_logprobs=top_logp, topk_ids=top_ids)


@torch.no_grad()
def feature_teacher_batch(actor, prompts: list[list[int]], outputs, pad_id: int, temperature: float,
                          top_k: int, chunk: int = 8) -> Experience:
    """teacher_batch's result from the features the engine kept while sampling (the actor's final-norm output,
    what its LM head reads): the teacher is the LM head on them, with no second forward over the samples."""
    responses = [o.token_ids for o in outputs]
    seqs, attn, action = make_sequences(prompts, responses, pad_id)
    R, k = action.shape[1], min(top_k, actor.config.vocab_size)
    top_logp, top_ids = torch.zeros(len(outputs), R, k), torch.zeros(len(outputs), R, k, dtype=torch.long)
    weight = actor.get_output_embeddings().weight
    for i in range(0, len(outputs), chunk):
        rows = [(j, o.features[len(p) - 1:len(p) - 1 + len(o.token_ids)])  # feature t predicts token t + 1
                for j, (p, o) in enumerate(zip(prompts[i:i + chunk], outputs[i:i + chunk]), start=i)]
        feats = torch.cat([f for _, f in rows]).to(weight.dtype)
        logp = torch.log_softmax(torch.nn.functional.linear(feats, weight).float() / temperature, dim=-1)
        values, ids = logp.topk(k, dim=-1)
        at = 0
        for j, f in rows:
            top_logp[j, :len(f)], top_ids[j, :len(f)] = values[at:at + len(f)], ids[at:at + len(f)]
            at += len(f)
    return Experience(seqs, attn, action, R, topk_logprobs=top_logp, topk_ids=top_ids)


def keeps_features(actor_path: str) -> bool:
    """Whether the engine can keep this actor's features while it samples (a head's architectures)."""
    from transformers import AutoConfig

    from drafting.model.head import head_supports

    return head_supports(AutoConfig.from_pretrained(actor_path).model_type)


@torch.no_grad()
def held_out_scores(actor, draft, batch: Experience, temperature: float, chunk: int = 32) -> dict[str, float]:
    """Mean acceptance probability and draft/actor top-1 agreement over the response positions."""
    draft.eval()
    accept, agree, n = 0.0, 0, 0
    for i in range(0, batch.batch_size, chunk):
        mb = batch.select(slice(i, i + chunk))
        p, _ = response_logits(actor, mb.sequences, mb.attention_mask, mb.num_actions, temperature)
        q, _ = response_logits(draft, mb.sequences, mb.attention_mask, mb.num_actions, temperature)
        mask = mb.action_mask[:, :p.shape[1]].bool()
        accept += float(acceptance_probability(p[mask], q[mask]).sum())
        agree += int((p[mask].argmax(-1) == q[mask].argmax(-1)).sum())
        n += int(mask.sum())
    return {"acceptance": accept / max(n, 1), "top1_agreement": agree / max(n, 1), "positions": n}
