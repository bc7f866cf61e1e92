"""Update rules: learned (coordinatewise LSTMs) and hand-designed (SGD, Adam)."""

from __future__ import annotations

from typing import Any

from .base import RuleState, UpdateRule
from .general import GeneralLSTMRule
from .hand import AdamRule, SGDRule
from .lstm import LSTMRule
from .scheduled import ScheduledRule

__all__ = [
    "RULES",
    "AdamRule",
    "GeneralLSTMRule",
    "LSTMRule",
    "RuleState",
    "SGDRule",
    "ScheduledRule",
    "UpdateRule",
    "build_rule",
]

#: Rule classes by their ``kind`` (the name saved in checkpoints).
RULES: dict[str, type[UpdateRule]] = {
    cls.kind: cls for cls in (LSTMRule, SGDRule, AdamRule, GeneralLSTMRule, ScheduledRule)
}


def build_rule(kind: str, config: dict[str, Any] | None = None) -> UpdateRule:
    """Construct a rule from its ``kind`` and :meth:`UpdateRule.config` dictionary.

    Raises:
        ValueError: unknown kind or configuration keys.
    """
    if kind not in RULES:
        raise ValueError(f"Unknown rule kind {kind!r}; expected one of {sorted(RULES)}")
    config = dict(config or {})
    if "betas" in config:
        config["betas"] = tuple(config["betas"])
    try:
        return RULES[kind](**config)
    except TypeError as exc:
        raise ValueError(f"Invalid configuration for rule {kind!r}: {config} ({exc})") from exc
