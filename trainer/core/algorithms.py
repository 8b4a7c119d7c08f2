"""PPO / GRPO maths as pure functions over tensors: KL, token rewards, GAE, group advantages, losses.

Shapes: B = batch of sequences, R = response width (right-padded), mask = action_mask [B, R] (1 on real
response tokens). Every mean over tokens is a masked mean, so padding never leaks into a loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KL_ESTIMATORS = ("k1", "k2", "k3")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (over everything, or along `dim`)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions; shift_mean=False keeps the mean (only rescales)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(policy || ref) estimate from sampled-token log-probs (Schulman's k1/k2/k3)."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        # r = ref/policy; exp(log r) - log r - 1 >= 0, unbiased. Clamp keeps exp finite on outliers.
        log_r = (-log_ratio).clamp(-20.0, 20.0)
        return torch.exp(log_r) - log_r - 1.0
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def last_token_index(action_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real response token of each row [B] (0 for an empty response)."""
    width = action_mask.shape[-1]
    positions = torch.arange(width, device=action_mask.device).expand_as(action_mask)
    return torch.where(action_mask.bool(), positions, torch.zeros_like(positions)).max(dim=-1).values


def clip_reward(score: torch.Tensor, reward_clip: float | None) -> torch.Tensor:
    if reward_clip is None or reward_clip <= 0:
        return score
    return score.clamp(-reward_clip, reward_clip)


def compute_rewards(
    score: torch.Tensor,  # [B]
    kl: torch.Tensor,  # [B, R]
    action_mask: torch.Tensor,  # [B, R]
    kl_coef: float,
    reward_clip: float | None = None,
) -> torch.Tensor:
    """Token-level rewards [B, R]: -kl_coef * kl on every response token, + clipped score on the last one."""
    mask = action_mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    last = last_token_index(action_mask)  # [B]
    bonus = clip_reward(score.to(kl.dtype), reward_clip)
    return rewards.scatter_add(1, last[:, None], bonus[:, None])


@torch.no_grad()
def compute_gae(
    rewards: torch.Tensor,  # [B, R]
    values: torch.Tensor,  # [B, R]
    action_mask: torch.Tensor,  # [B, R]
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation; V = 0 after the last real token. Returns (advantages, returns)."""
    mask = action_mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    width = rewards.shape[1]
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(width)):
        next_value = values[:, t + 1] if t + 1 < width else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    returns = advantages + values
    return advantages * mask, returns * mask


def grpo_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-6, norm_std: bool = True) -> torch.Tensor:
    """Group-normalised scores (s - mean_g) / (std_g + eps) [B]; groups are contiguous runs of group_size.

    std is the unbiased sample std (as in OpenRLHF / verl); a group of one gets advantage 0.
    norm_std=False keeps s - mean_g (Dr. GRPO, verl's norm_adv_by_std_in_grpo=False): dividing by a tiny
    std blows small score differences within a group up to full-size advantages.
    """
    if group_size < 1 or scores.numel() % group_size != 0:
        raise ValueError(f"batch of {scores.numel()} scores does not split into groups of group_size={group_size}")
    groups = scores.float().view(-1, group_size)  # [G, n]
    mean = groups.mean(dim=1, keepdim=True)
    if not norm_std:
        return (groups - mean).view(-1)
    std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    return ((groups - mean) / (std + eps)).view(-1)


def expand_to_tokens(adv: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sequence advantage [B] to every real response token [B, R]."""
    return adv[:, None].to(torch.float32) * action_mask.to(torch.float32)


def policy_loss(
    logp: torch.Tensor,  # [B, R]
    old_logp: torch.Tensor,  # [B, R]
    advantages: torch.Tensor,  # [B, R]
    action_mask: torch.Tensor,  # [B, R]
    clip_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate, token mean. Returns (loss, clip_frac, approx_kl); the last two carry no grad.

    clip_frac = share of tokens where the clipped term is the active (smaller) one;
    approx_kl = token mean of 0.5 * (logp - old_logp)^2.
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    loss = masked_mean(-torch.min(surr1, surr2), action_mask)
    with torch.no_grad():
        clip_frac = masked_mean((surr2 < surr1).float(), action_mask)
        approx_kl = masked_mean(0.5 * log_ratio**2, action_mask)
    return loss, clip_frac, approx_kl


def value_loss(
    values: torch.Tensor,  # [B, R]
    old_values: torch.Tensor,  # [B, R]
    returns: torch.Tensor,  # [B, R]
    action_mask: torch.Tensor,  # [B, R]
    clip_eps: float | None,
) -> torch.Tensor:
    """Clipped value loss 0.5 * max((v - R)^2, (clip(v) - R)^2), clip around old_values; None = unclipped."""
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        return 0.5 * masked_mean(unclipped, action_mask)
    v_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    clipped = (v_clipped - returns) ** 2
    return 0.5 * masked_mean(torch.max(unclipped, clipped), action_mask)


def kl_loss(
    logp: torch.Tensor, ref_logp: torch.Tensor, action_mask: torch.Tensor, estimator: str = "k3"
) -> torch.Tensor:
    """GRPO's KL-as-loss: token mean of the per-token KL estimate."""
    return masked_mean(kl_penalty(logp, ref_logp, estimator), action_mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim: logsumexp(z) - sum(p * z). [..., V] -> [...]."""
    logits = logits.float()
    probs = F.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


class RunningMoments:
    """Running mean / unbiased std of every score seen (parallel-variance merge), for reward normalisation."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the running mean

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def update(self, x: torch.Tensor) -> tuple[float, float]:
        """Fold a batch in; returns the batch's (mean, unbiased std)."""
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return self.mean, self.std
        batch_mean = x.mean().item()
        batch_m2 = ((x - batch_mean) ** 2).sum().item()
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total
        return batch_mean, math.sqrt(batch_m2 / (n - 1)) if n > 1 else 0.0

    def normalize(self, x: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
        out = x / (self.std + eps) if not shift_mean else (x - self.mean) / (self.std + eps)
        return out.to(x.dtype)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])
