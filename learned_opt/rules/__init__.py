"""Update rules: learned (coordinatewise LSTMs) and hand-designed (SGD, Adam)."""

from __future__ import annotations

from typing import Any

from .base import RULES, RuleState, UpdateRule
from .corrected_adam import LSTMCorrectedAdamRule
from .corrected_adam_config import LSTMCorrectedAdamConfig
from .general import GeneralLSTMRule
from .hand import AdamRule, SGDRule
from .lstm import LSTMRule
from .scheduled import ScheduledRule

__all__ = [
    "RULES",
    "AdamRule",
    "GeneralLSTMRule",
    "LSTMCorrectedAdamConfig",
    "LSTMCorrectedAdamRule",
    "LSTMRule",
    "RuleState",
    "SGDRule",
    "ScheduledRule",
    "UpdateRule",
    "build_rule",
]

# RULES: rule classes by their ``kind`` (the name saved in checkpoints), each class entered as
# it is defined, a user's too (UpdateRule.__init_subclass__). ``"general-lstm"`` is
# LSTMCorrectedAdamRule with the options a configuration leaves out at the former defaults
# (those of every saved configuration and documented command); ``"lstm-corrected-adam"`` is the
# same rule with them at the shipped configuration (LSTMCorrectedAdamConfig), e.g.
# ``--rule lstm-corrected-adam`` with no options.
RULES["lstm-corrected-adam"] = LSTMCorrectedAdamRule


def build_rule(kind: str, config: dict[str, Any] | None = None) -> UpdateRule:
    """Construct a rule from its ``kind`` and :meth:`UpdateRule.config` dictionary.

    Raises:
        ValueError: unknown kind or configuration keys (for ``"general-lstm"``, also an option
            that was removed, at a value other than its remaining one).
    """
    if kind not in RULES:
        raise ValueError(f"Unknown rule kind {kind!r}; expected one of {sorted(RULES)}")
    config = dict(config or {})
    if "betas" in config:
        config["betas"] = tuple(config["betas"])
    try:
        if RULES[kind] is LSTMCorrectedAdamRule:
            if kind == "general-lstm":
                return LSTMCorrectedAdamRule.from_config(config)
            return LSTMCorrectedAdamRule.from_config(config, LSTMCorrectedAdamConfig())
        return RULES[kind](**config)
    except TypeError as exc:
        raise ValueError(f"Invalid configuration for rule {kind!r}: {config} ({exc})") from exc
