"""Sampling schemes compared against the engine's position-keyed Gumbel-max (`drafting.noise.GumbelScheme`),
plugged in through the engine's scheme seam: `engine.stages.scheme = ...; engine.stages.drafter.scheme = ...`.

- `inverse_cdf`: position-keyed too (one uniform per position, the draft coupled on the same uniform):
  schedule-invariant, but its coupling is weaker.
- `residual`: the scheme the engine used before: children are the draft's top-k by probability and are tried
  by sequential residual rejection. Exactly distributed, but its draws depend on the tree, so seeded tokens
  change with the strategy and the batch.
Both are exact; they are kept here, as baselines of `bench.rollout`, not in the engine."""
from __future__ import annotations

import torch

from drafting.spec.noise import uniform
from drafting.spec.sampling import sample_from


class InverseCdfScheme:
    name = "inverse_cdf"

    def candidates(self, probs: torch.Tensor, keys: torch.Tensor, k: int, block: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The draft's inverse-CDF token under the position's uniform first, then its most likely others."""
        first = sample_from(probs, uniform(keys))  # [N]
        rest = probs.scatter(1, first[:, None], -1.0).topk(k - 1, dim=-1).indices if k > 1 else first[:, None][:, :0]
        tok = torch.cat([first[:, None], rest], dim=1)
        return tok, torch.zeros(tok.shape, device=probs.device)

    def token(self, probs: torch.Tensor, keys: torch.Tensor, children, block: int) -> torch.Tensor:
        return sample_from(probs, uniform(keys))


class ResidualScheme:
    name = "residual"

    def candidates(self, probs: torch.Tensor, keys: torch.Tensor, k: int, block: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        top, tok = probs.topk(k, dim=-1)
        logq = top.double().log()
        margin = torch.cat([logq[:, :1] - logq[:, 1:2] if k > 1 else torch.full_like(logq[:, :1], 1e3),
                            logq[:, 1:] - logq[:, :1]], dim=1)
        return tok, margin.float()

    def token(self, probs: torch.Tensor, keys: torch.Tensor, children: torch.Tensor | None, block: int
              ) -> torch.Tensor:
        """Children x1..xK (point-mass proposals) tried in draft order: xi accepted with probability r(xi), r = p
        with the rejected children zeroed and renormalised; all rejected: a draw from the final residual."""
        M, V = probs.shape
        if children is None:
            return sample_from(probs, uniform(keys))
        K = children.shape[1]
        ok = children >= 0
        tok = children.clamp(min=0)
        pj = probs.gather(1, tok) * ok  # [M, K]
        ratio = pj / (1.0 - (pj.cumsum(dim=1) - pj)).clamp(min=1e-30)
        u = torch.stack([uniform(keys, stream=j) for j in range(K + 1)], dim=1)  # [M, K + 1]
        hit = ok & (u[:, :K] < ratio)
        tried = torch.zeros(M, V + 1, dtype=torch.bool, device=probs.device).scatter_(
            1, torch.where(ok, tok, V), True)[:, :V]
        resid = probs.masked_fill(tried, 0.0)
        resid = torch.where(resid.sum(dim=1, keepdim=True) > 0, resid, probs)
        final = sample_from(resid, u[:, K])
        first = tok.gather(1, hit.to(torch.int8).argmax(dim=1, keepdim=True)).squeeze(1)
        return torch.where(hit.any(dim=1), first, final)


SCHEMES = {"inverse_cdf": InverseCdfScheme, "residual": ResidualScheme}


def use_scheme(engine, name: str) -> None:
    """Switch an engine's sampling scheme ('gumbel' keeps the engine's own)."""
    if name == "gumbel":
        return
    engine.stages.scheme = SCHEMES[name]()
    if engine.stages.drafter is not None:
        engine.stages.drafter.scheme = engine.stages.scheme
