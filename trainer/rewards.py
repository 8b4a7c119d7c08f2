"""Rule rewards by name: `score(prompt: str, response: str) -> float`, imported only when asked for."""

from __future__ import annotations

import importlib
from typing import Callable

RuleReward = Callable[[str, str], float]

# name -> "module:function"; the import is lazy so a rule's module loads only in the actor that uses it.
RULE_REWARDS: dict[str, str] = {
    "tiny_task": "trainer.tiny.task:score",
}


def get_rule_reward(name: str) -> RuleReward:
    """The rule reward registered as `name`; an unknown name is a ValueError listing the known ones."""
    if name not in RULE_REWARDS:
        raise ValueError(f"unknown rule reward {name!r}; known: {sorted(RULE_REWARDS)}")
    module_name, fn_name = RULE_REWARDS[name].split(":")
    return getattr(importlib.import_module(module_name), fn_name)
