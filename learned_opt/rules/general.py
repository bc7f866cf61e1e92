"""``GeneralLSTMRule``: the former name of :class:`~learned_opt.rules.LSTMCorrectedAdamRule`,
with the former keyword defaults.

``GeneralLSTMRule(**options)`` builds an :class:`~learned_opt.rules.LSTMCorrectedAdamRule` whose
unspecified options take the defaults the former class had
(:data:`~learned_opt.rules.corrected_adam_config.GENERAL_LSTM_DEFAULTS`: a 32-unit LSTM that is
Adam with lr 1e-3 at initialization, no adaptation or clipping), so code and commands written
for it keep their meaning; ``isinstance(rule, GeneralLSTMRule)`` holds for every
:class:`~learned_opt.rules.LSTMCorrectedAdamRule`. Weights saved under the checkpoint kind
``"general-lstm"`` load as :class:`~learned_opt.rules.LSTMCorrectedAdamRule`.
"""

from __future__ import annotations

from typing import Any

from .corrected_adam import LSTMCorrectedAdamRule
from .corrected_adam_config import GENERAL_LSTM_DEFAULTS

__all__ = ["GeneralLSTMRule"]


class _FormerName(type):
    """Calls build the rule with the former defaults; instance and subclass checks are those of
    :class:`~learned_opt.rules.LSTMCorrectedAdamRule`."""

    def __call__(cls, *args: Any, **options: Any) -> LSTMCorrectedAdamRule:  # type: ignore[override]
        if len(args) > 2:
            raise TypeError("GeneralLSTMRule takes at most hidden_size and num_layers by position")
        options.update(zip(("hidden_size", "num_layers"), args))
        return LSTMCorrectedAdamRule(GENERAL_LSTM_DEFAULTS, **options)

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, LSTMCorrectedAdamRule)

    def __subclasscheck__(cls, sub: type) -> bool:
        return issubclass(sub, LSTMCorrectedAdamRule)


class GeneralLSTMRule(metaclass=_FormerName):
    """The former name of :class:`~learned_opt.rules.LSTMCorrectedAdamRule`; calling it builds
    that rule with the former keyword defaults
    (:data:`~learned_opt.rules.corrected_adam_config.GENERAL_LSTM_DEFAULTS`)."""

    kind = LSTMCorrectedAdamRule.kind
