"""What a :class:`~learned_opt.outer.config.MetaTrainConfig` builds: task families, the initial
rule and learner, the loss-averse objective's reference, the estimator and the meta-optimizer."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import pretrained, rules
from ..checkpoint import load_rule
from ..learners import MetaLearner, OptimizerLearner
from ..tasks import TaskFamily, make_family
from .checkpoints import find_checkpoints
from .config import MetaTrainConfig
from .estimators import Estimator
from .estimators import build_estimator as estimator_by_name

__all__ = [
    "build_estimator",
    "build_eval_family",
    "build_family",
    "build_learner",
    "build_meta_optimizer",
    "build_reference",
    "build_rule",
    "meta_param_groups",
]


def build_family(config: MetaTrainConfig) -> TaskFamily:
    """The meta-training tasks: ``make_family(config.family, **config.family_kwargs)``."""
    return make_family(config.family, **config.family_kwargs)


def build_eval_family(config: MetaTrainConfig, family: TaskFamily) -> TaskFamily:
    """The held-out evaluation tasks: ``config.eval_family`` if set, else ``family``."""
    if config.eval_family is None:
        return family
    return make_family(config.eval_family, **config.eval_family_kwargs)


def build_rule(config: MetaTrainConfig, ckpt_dir: str | Path | None = None) -> rules.UpdateRule:
    """The rule the run starts from: ``config.init_weights`` (its architecture from the file),
    or a ``config.rule`` initialized from ``config.seed``. Where the ``init_weights`` file is
    gone and ``ckpt_dir`` holds the run's checkpoints (a run to resume, on a machine without
    the file), the newest one's rule: resuming restores its weights anyway."""
    if config.init_weights is not None:
        try:
            source = pretrained.resolve(config.init_weights)
        except ValueError:
            found = [] if ckpt_dir is None else find_checkpoints(ckpt_dir)
            if not found:
                raise
            source = found[0]
            warnings.warn(
                f"init_weights {config.init_weights!r} is gone: the rule's architecture is "
                f"read from {source} (resuming the run restores its weights)",
                UserWarning,
                stacklevel=4,
            )
        rule, _ = load_rule(source, expected_kind=config.rule)
        if config.rule_kwargs:  # they cannot change the file's rule: they must describe it
            mine, theirs = rules.build_rule(config.rule, config.rule_kwargs).config(), rule.config()
            if diff := {k: (mine[k], theirs.get(k)) for k in mine if mine[k] != theirs.get(k)}:
                raise ValueError(
                    f"rule_kwargs differ from the rule of init_weights {config.init_weights!r} "
                    f"(given, the file's): {diff}; its rule comes from the file: leave "
                    "rule_kwargs out"
                )
        return rule
    rule = rules.build_rule(config.rule, config.rule_kwargs)
    if hasattr(rule, "reset_parameters"):
        rule.reset_parameters(torch.Generator().manual_seed(config.seed))
    return rule


def build_learner(config: MetaTrainConfig, ckpt_dir: str | Path | None = None) -> MetaLearner:
    """An :class:`~learned_opt.learners.OptimizerLearner` around :func:`build_rule`, its
    meta-parameters limited to ``config.train_only``'s (:func:`train_only`)."""
    rule = build_rule(config, ckpt_dir)
    if config.train_only:
        train_only(rule, config.train_only.split(","))
    return OptimizerLearner(rule, second_order=config.second_order)


def train_only(rule: nn.Module, prefixes: list[str]) -> None:
    """Fix every parameter of ``rule`` whose name starts with none of ``prefixes``
    (``requires_grad=False``).

    Raises:
        ValueError: a prefix names no trainable parameter of the rule.
    """
    prefixes = [p.strip() for p in prefixes if p.strip()]
    trainable = {n for n, p in rule.named_parameters() if p.requires_grad}
    for prefix in prefixes:
        if not any(n.startswith(prefix) for n in trainable):
            raise ValueError(
                f"train_only: {prefix!r} names none of the rule's trainable parameters "
                f"({', '.join(sorted(trainable))})"
            )
    for name, param in rule.named_parameters():
        if not name.startswith(tuple(prefixes)):
            param.requires_grad_(False)


def build_reference(config: MetaTrainConfig, learner: MetaLearner) -> MetaLearner | None:
    """With ``loss_aversion``, a frozen copy of ``learner`` as it starts (the objective's
    reference); otherwise ``None``."""
    if config.loss_aversion is None:
        return None
    reference = copy.deepcopy(learner)
    reference.requires_grad_(False)
    return reference


def build_estimator(config: MetaTrainConfig) -> Estimator:
    """The configured meta-gradient estimator (TBPTT with the configured checkpointing)."""
    kwargs = dict(config.estimator_kwargs)
    if config.estimator == "tbptt":
        kwargs.setdefault("checkpoint_segment", config.checkpoint_segment())
    return estimator_by_name(config.estimator, **kwargs)


def meta_param_groups(learner: MetaLearner, meta_lr: float) -> list[dict[str, Any]]:
    """The Adam parameter groups of ``learner`` (see ``MetaLearner.meta_param_groups``), each
    with its ``base_lr`` (the meta learning-rate schedule scales it)."""
    groups, seen = [], set()
    for g in learner.meta_param_groups():
        params = list(g["params"])
        scale = float(g.get("lr_scale", 1.0))
        if not scale > 0:
            raise ValueError(f"Invalid lr_scale {scale} in the learner's meta_param_groups")
        seen.update(id(p) for p in params)
        groups.append({"params": params, "lr": meta_lr * scale, "base_lr": meta_lr * scale})
    if seen != {id(p) for p in learner.parameters()} or sum(
        len(g["params"]) for g in groups
    ) != len(seen):
        raise ValueError("meta_param_groups must hold each of the learner's parameters once")
    return groups


def build_meta_optimizer(config: MetaTrainConfig, learner: MetaLearner) -> torch.optim.Adam:
    """Adam over :func:`meta_param_groups` at ``config.meta_lr``."""
    return torch.optim.Adam(meta_param_groups(learner, config.meta_lr))
