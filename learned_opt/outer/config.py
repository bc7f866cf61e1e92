"""The configuration of a meta-training run (saved in every checkpoint and log).

Each field documents itself in its ``help`` metadata, which is also the help of its
``learned-opt meta-train`` option: the command line's options are derived from these fields
(:func:`learned_opt.cli.add_config_options`), a field ``foo_bar`` becoming ``--foo-bar``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..evaluate import task_seed
from ..tasks import FAMILIES, sample_horizon
from .estimators import ESTIMATORS
from .grad_checkpoint import checkpoint_schedule, checkpoint_segments
from .unroll import OBJECTIVES, UnrollSpec

__all__ = ["META_LR_SCHEDULES", "MetaTrainConfig", "parse_segments"]

#: Meta learning-rate schedules (``MetaTrainConfig.meta_lr_schedule``).
META_LR_SCHEDULES = ("constant", "cosine")
#: Task ``j`` of iteration ``i`` draws from ``task_seed(seed, i, j)`` plus these offsets.
_TASK_OFFSET, _INNER_STATE_OFFSET, _HORIZON_OFFSET, _TOLD_OFFSET = 0, 1, 2, 3


def parse_segments(text: str) -> int | tuple[int, ...]:
    """``grad_checkpoint_segment`` from text: ``S`` or ``S1,S2,...``."""
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an integer or a comma-separated list: {text!r}"
        ) from None
    return sizes[0] if len(sizes) == 1 else sizes


def _family_names() -> list[str]:
    return sorted(FAMILIES)


def _opt(
    default: Any,
    help: str,
    *,
    cli: bool = True,
    choices: Callable[[], Any] | Any = None,
    metavar: str | None = None,
    parse: Callable[[str], Any] | None = None,
) -> Any:
    """A field with its documentation and, with ``cli``, how its command-line option reads:
    ``choices`` (a sequence, or a function giving one when the parser is built), ``metavar``,
    ``parse`` (text -> value; by default from the field's type)."""
    meta = {"help": help, "cli": cli, "choices": choices, "metavar": metavar, "parse": parse}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class MetaTrainConfig:
    """Everything that defines a meta-training run; each field's ``help`` metadata says what it
    is (``dataclasses.fields(MetaTrainConfig)``, or ``learned-opt meta-train --help``)."""

    family: str = _opt(
        "quadratic", "task family (learned_opt.tasks.FAMILIES)", choices=_family_names
    )
    family_kwargs: dict[str, Any] = _opt({}, "overrides of the family's defaults")
    rule: str = _opt("lstm", "rule kind (learned_opt.rules.RULES)")
    rule_kwargs: dict[str, Any] = _opt(
        {},
        "the rule's constructor arguments, e.g. "
        '\'{"hidden_size": 20, "num_layers": 2, "preprocess_p": 5}\'',
    )
    init_weights: str | None = _opt(
        None,
        "start from these weights (a shipped name or a weights/checkpoint file: fine-tune) "
        "instead of a random initialization; the rule's architecture comes from the file",
    )
    train_only: str | None = _opt(
        None,
        "meta-train only the rule's parameters whose names start with one of these "
        "comma-separated prefixes (e.g. 'schedule.2.'); the others stay as they start",
    )
    horizon: int = _opt(100, "inner steps per task (T); with --min-horizon, the longest drawn")
    min_horizon: int | None = _opt(
        None,
        "draw each task's horizon log-uniformly in [min-horizon, horizon] (heavy-tailed: every "
        "octave of lengths gets the same share of tasks); unset: every task runs horizon steps",
    )
    untold_fraction: float = _opt(
        0.0,
        "the share of tasks whose rule is not told its horizon (drawn per task): a rule that "
        "reads how far training has gone then learns to run with total_steps and without it",
    )
    truncation: int = _opt(20, "inner steps per truncation window (K); one meta-step per window")
    objective: str = _opt(
        "train",
        "train: mean training loss over the window (the paper); test: held-out loss at the "
        "end of the window; final-train: training loss at the end of the window (a fresh "
        "minibatch)",
        choices=OBJECTIVES,
    )
    log_meta_loss: bool = _opt(
        False,
        "meta-loss = log of the objective (tasks of any loss scale weigh alike); the held-out "
        "evaluation then reports geometric means of the final losses",
    )
    second_order: bool = _opt(False, "backpropagate through the optimizee's gradients")
    estimator: str = _opt(
        "tbptt",
        "meta-gradient estimator: truncated backpropagation, persistent ES (unbiased, memory "
        "independent of K and T) or truncated antithetic ES",
        choices=lambda: sorted(ESTIMATORS),
    )
    estimator_kwargs: dict[str, Any] = _opt(
        {}, 'the estimator\'s arguments, e.g. \'{"sigma": 0.01, "pairs": 8}\' for pes/es'
    )
    meta_loss_floor: float = _opt(
        0.0,
        "with --log-meta-loss, a window's meta-loss is log(L + F L_1), L_1 the unroll's first "
        "training loss: a task driven near zero loss (below about F L_1) stops steering the "
        "meta-gradient by the ratios of its tiny losses",
        metavar="F",
    )
    loss_aversion: float | None = _opt(
        None,
        "loss-averse meta-objective: a window's meta-loss is log(L / L_ref) against the rule "
        "the run starts from (frozen, kept in checkpoints, unrolled beside it on the same "
        "batches), times 1 + LAMBDA where positive, so that large gains on a few tasks cannot "
        "pay for losses on others; needs --log-meta-loss and tbptt",
        metavar="LAMBDA",
    )
    grad_checkpoint: bool = _opt(
        False,
        "gradient checkpointing: recompute the inner steps during the meta-backward instead of "
        "keeping them (by default nested segments: O(log K) inner states and one step's "
        "activations alive instead of K steps', for ~ceil(log8 K) extra forward passes; same "
        "meta-gradients; a run may be resumed with it switched on or off; with glibc, also set "
        "MALLOC_MMAP_THRESHOLD_=131072 in the environment, or the freed memory stays in the "
        "heap: see the README)",
    )
    grad_checkpoint_segment: int | tuple[int, ...] | None = _opt(
        None,
        "inner steps per checkpointed segment (one level), or nested segment lengths "
        "S1 > S2 > ... (e.g. 25,5,1); default: checkpoint_schedule(truncation)",
        metavar="S[,S2,...]",
        parse=parse_segments,
    )
    meta_lr: float = _opt(
        1e-3,
        "Adam learning rate of the meta-optimizer (times each of the learner's "
        "meta_param_groups scales)",
    )
    meta_lr_schedule: str = _opt(
        "constant",
        "cosine: the meta learning rate decays as (1 + cos(pi i / iterations)) / 2 at "
        "iteration i, so that the weights a run ends with are not one noisy meta-step's "
        "(resuming with more iterations stretches what is left of it)",
        choices=META_LR_SCHEDULES,
    )
    meta_batch: int = _opt(
        1, "tasks unrolled side by side per meta-step (over all processes), losses averaged"
    )
    clip_grad: float = _opt(1.0, "maximum meta-gradient norm (0: no clipping)")
    clip_grad_per_task: bool = _opt(
        False,
        "also clip each task's meta-gradient at --clip-grad before the mean, so that one task "
        "whose meta-loss is chaotic (a gradient norm thousands of times the others') cannot "
        "steer the meta-step alone",
    )
    iterations: int = _opt(500, "task batches to unroll (each gives ceil(T / K) meta-steps)")
    time_budget: float | None = _opt(
        None, "stop after this many seconds of meta-training (held-out evaluations included)"
    )
    eval_every: int = _opt(50, "iterations between held-out evaluations (0: none)")
    eval_tasks: int = _opt(8, "held-out tasks per evaluation")
    eval_horizon: int | None = _opt(
        None, "inner steps of the held-out evaluation (default: --horizon)"
    )
    eval_family: str | None = _opt(
        None,
        "family of the held-out tasks that select the best weights (default: --family). A "
        "learned optimizer meant to transfer should be selected on tasks outside its "
        "meta-training distribution: selecting on tasks like the meta-training ones keeps "
        "improving in distribution while the transfer gets worse",
        choices=_family_names,
    )
    eval_family_kwargs: dict[str, Any] = _opt({}, "keyword arguments of --eval-family")
    eval_untold: bool = _opt(
        False,
        "the held-out evaluation runs each task twice, told its length and not (for rules that "
        "read it; others once): the metric aggregates both runs of every task, so that weights "
        "meant for both uses are selected on both (each half is logged too: eval/metric_told, "
        "eval/metric_untold)",
    )
    eval_balanced: bool = _opt(
        False,
        "the held-out tasks take the members of a mixture --eval-family in turn (task k from "
        "member k mod n), so that every member weighs alike in the metric instead of as the "
        "mixture happens to draw them",
    )
    checkpoint_every: int = _opt(10, "iterations between checkpoints")
    keep_checkpoints: int = _opt(3, "how many recent checkpoints to keep", cli=False)
    max_loss_ratio: float | None = _opt(
        1e3, "an inner loss above this multiple of its first value ends the unroll", cli=False
    )
    rollback_after: int = _opt(
        3,
        "after this many non-finite meta-steps in a row (each one skipped), roll back to the "
        "last good checkpoint and scale the meta learning rate by rollback_lr_factor",
        cli=False,
    )
    rollback_lr_factor: float = _opt(0.5, "see rollback_after", cli=False)
    seed: int = _opt(0, "the seed of everything")

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"Invalid objective {self.objective!r}; expected one of {OBJECTIVES}")
        names = (
            "horizon",
            "truncation",
            "meta_batch",
            "iterations",
            "eval_tasks",
            "checkpoint_every",
        )
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"Invalid {name}: {getattr(self, name)} (must be >= 1)")
        if self.eval_every < 0:
            raise ValueError(f"Invalid eval_every: {self.eval_every} (must be >= 0; 0: none)")
        if self.eval_family_kwargs and self.eval_family is None:
            raise ValueError(
                "eval_family_kwargs given without eval_family (they configure --eval-family; "
                "the held-out tasks otherwise come from --family with its own arguments)"
            )
        if not (math.isfinite(self.meta_lr) and self.meta_lr > 0):
            raise ValueError(f"Invalid meta learning rate: {self.meta_lr}")
        if not (math.isfinite(self.clip_grad) and self.clip_grad >= 0):
            raise ValueError(f"Invalid clip_grad: {self.clip_grad} (must be >= 0; 0: no clipping)")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"Invalid time_budget: {self.time_budget} (seconds, must be > 0)")
        if self.eval_horizon is not None and self.eval_horizon < 1:
            raise ValueError(f"Invalid eval_horizon: {self.eval_horizon} (must be >= 1)")
        if self.meta_lr_schedule not in META_LR_SCHEDULES:
            raise ValueError(
                f"Unknown meta_lr_schedule {self.meta_lr_schedule!r}; expected one of "
                f"{META_LR_SCHEDULES}"
            )
        if self.min_horizon is not None and not 1 <= self.min_horizon <= self.horizon:
            raise ValueError(
                f"Invalid min_horizon: {self.min_horizon} (must be in [1, horizon={self.horizon}])"
            )
        if not 0.0 <= self.untold_fraction <= 1.0:
            raise ValueError(f"Invalid untold_fraction: {self.untold_fraction} (must be in [0, 1])")
        if self.estimator not in ESTIMATORS:
            raise ValueError(
                f"Unknown estimator {self.estimator!r}; expected one of {sorted(ESTIMATORS)}"
            )
        if (
            min(self.truncation, self.horizon) == 1
            and self.objective == "train"
            and self.estimator != "pes"
        ):
            raise ValueError(
                "windows of one step (truncation or horizon 1) with the 'train' objective give "
                "no meta-gradient: a window's "
                "training loss is measured before each of its steps, so a one-step window "
                "scores none of its updates (use truncation >= 2, another objective, or the "
                "'pes' estimator, whose windows carry their perturbations forward)"
            )
        if self.estimator != "tbptt" and (self.grad_checkpoint or self.second_order):
            raise ValueError(
                f"grad_checkpoint and second_order apply to backpropagation only, not to the "
                f"{self.estimator!r} estimator (which never builds a graph)"
            )
        if self.clip_grad_per_task and not self.clip_grad > 0:
            raise ValueError(
                "clip_grad_per_task needs clip_grad > 0 (the norm each task is clipped at)"
            )
        if not (math.isfinite(self.meta_loss_floor) and self.meta_loss_floor >= 0):
            raise ValueError(f"Invalid meta_loss_floor: {self.meta_loss_floor} (must be >= 0)")
        if self.meta_loss_floor and not self.log_meta_loss:
            raise ValueError("meta_loss_floor needs log_meta_loss (it floors the log's argument)")
        if self.loss_aversion is not None:
            if not (math.isfinite(self.loss_aversion) and self.loss_aversion >= 0):
                raise ValueError(f"Invalid loss_aversion: {self.loss_aversion} (must be >= 0)")
            if self.estimator != "tbptt" or not self.log_meta_loss:
                raise ValueError(
                    "loss_aversion needs the 'tbptt' estimator and log_meta_loss (the "
                    "meta-loss is a log-ratio to the starting rule's)"
                )
        segment = self.grad_checkpoint_segment
        if segment is not None:
            try:
                sizes = checkpoint_segments(segment)
            except (TypeError, ValueError):
                raise ValueError(
                    f"Invalid grad_checkpoint_segment: {segment} (must be >= 1, or nested "
                    "segment lengths S1 > S2 > ... >= 1)"
                ) from None
            # A list (from a JSON log) or a one-level tuple reads as the same setting.
            object.__setattr__(
                self, "grad_checkpoint_segment", sizes[0] if len(sizes) == 1 else sizes
            )

    def unroll_spec(self, horizon: int | None = None, told: bool = True) -> UnrollSpec:
        """The unroll of a meta-training task of ``horizon`` steps (default: ``horizon``),
        the rule told it or not."""
        return UnrollSpec(
            told=told,
            horizon=self.horizon if horizon is None else horizon,
            truncation=self.truncation,
            objective=self.objective,
            max_loss_ratio=self.max_loss_ratio,
            log_meta_loss=self.log_meta_loss,
            loss_aversion=self.loss_aversion or 0.0,
            meta_loss_floor=self.meta_loss_floor,
        )

    def task_generators(
        self, iteration: int, index: int
    ) -> tuple[torch.Generator, torch.Generator]:
        """The generators of task ``index`` of ``iteration``: of the task itself and of its
        inner state. A pure function of ``(seed, iteration, index)``, so a resumed run, or any
        number of processes, draws the same tasks."""
        seed = task_seed(self.seed, iteration, index)
        return (
            torch.Generator().manual_seed(seed + _TASK_OFFSET),
            torch.Generator().manual_seed(seed + _INNER_STATE_OFFSET),
        )

    def task_horizon(self, iteration: int, index: int) -> int:
        """The horizon of task ``index`` of ``iteration``: ``horizon``, or a log-uniform draw
        from its own seed stream when ``min_horizon`` is set."""
        if self.min_horizon is None:
            return self.horizon
        seed = task_seed(self.seed, iteration, index) + _HORIZON_OFFSET
        return sample_horizon(torch.Generator().manual_seed(seed), self.min_horizon, self.horizon)

    def task_told(self, iteration: int, index: int) -> bool:
        """Whether task ``index`` of ``iteration`` tells the rule its horizon: always with
        ``untold_fraction`` 0, else a draw from the task's own seed stream."""
        if self.untold_fraction <= 0:
            return True
        seed = task_seed(self.seed, iteration, index) + _TOLD_OFFSET
        draw = float(torch.rand((), generator=torch.Generator().manual_seed(seed)))
        return draw >= self.untold_fraction

    def checkpoint_segment(self) -> int | tuple[int, ...] | None:
        """The unroll's ``checkpoint_segment``: ``None`` without gradient checkpointing."""
        if not self.grad_checkpoint:
            return None
        return self.grad_checkpoint_segment or checkpoint_schedule(self.truncation)

    def eval_horizon_steps(self) -> int:
        """Inner steps of the held-out evaluation."""
        return self.eval_horizon or self.horizon

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MetaTrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
