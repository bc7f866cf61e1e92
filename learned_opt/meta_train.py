"""The outer loop: meta-optimizer, clipping, evaluation, logging, checkpoints, resume.

One trainer trains any :class:`~learned_opt.learners.MetaLearner`. Randomness is a pure function
of ``(seed, iteration, task index)``, so a resumed run repeats exactly what an uninterrupted run
would have done.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed
from .checkpoint import CheckpointError, atomic_save, load_rule, rule_to_dict, safe_load
from .estimators import ESTIMATORS, Estimator, average_gradients, build_estimator, set_gradients
from .evaluate import DEFAULT_LR_GRID, run_optimizer, task_seed
from .learners import MetaLearner, OptimizerLearner
from .optim import LearnedOptimizer
from .rules import build_rule
from .tasks import TaskFamily, make_family, sample_horizon
from .unroll import OBJECTIVES, checkpoint_schedule, checkpoint_segments, unroll

__all__ = ["MetaTrainConfig", "MetaTrainer", "TRAINER_FORMAT", "find_checkpoints"]

TRAINER_FORMAT = "learned_opt.trainer/1"
#: Meta learning-rate schedules (``MetaTrainConfig.meta_lr_schedule``).
META_LR_SCHEDULES = ("constant", "cosine")
_EVAL_STREAM = 7_777_777  # seeds of held-out evaluation tasks never collide with training ones
_HORIZON_STREAM = 2  # offset of the seed of a task's horizon draw (task: +0, inner state: +1)


@dataclass(frozen=True)
class MetaTrainConfig:
    """Everything that defines a meta-training run (saved in every checkpoint and log).

    Attributes:
        family: task family name (:data:`learned_opt.tasks.FAMILIES`).
        family_kwargs: overrides of the family's defaults.
        rule: rule kind (:data:`learned_opt.rules.RULES`).
        rule_kwargs: the rule's constructor arguments.
        init_weights: start from these weights (a shipped name or a weights/checkpoint file)
            instead of a random initialization; the rule's architecture comes from the file.
        horizon: inner steps per task (T); with ``min_horizon``, the longest horizon drawn.
        min_horizon: draw each task's horizon log-uniformly in ``[min_horizon, horizon]``
            (:func:`~learned_opt.tasks.sample_horizon`: heavy-tailed, every octave of lengths
            gets the same share of tasks); ``None``: every task runs ``horizon`` steps.
        truncation: inner steps per truncation window (K); one meta-update per window.
        objective: ``"train"`` (mean training loss over the window, the paper) or ``"test"``
            (held-out loss at the end of the window).
        log_meta_loss: the meta-loss of a window is the log of the objective, so that tasks
            of different loss scales weigh alike (see :func:`~learned_opt.unroll.unroll`); the
            held-out evaluation then reports the geometric mean of the final losses.
        second_order: backpropagate through the optimizee's gradients.
        estimator: the meta-gradient estimator (:data:`~learned_opt.estimators.ESTIMATORS`):
            ``"tbptt"`` (backpropagation through each window), ``"pes"`` (persistent evolution
            strategies: unbiased over the whole horizon, memory independent of K and T) or
            ``"es"`` (truncated antithetic ES).
        estimator_kwargs: the estimator's arguments (PES/ES: ``sigma``, ``pairs``).
        loss_aversion: if set (``lambda >= 0``), a loss-averse meta-objective relative to the
            rule the run starts from: that rule (frozen, kept in every checkpoint) is unrolled
            beside the one being trained, from the same initial state on the same batches, and
            a window's meta-loss is ``log(L / L_ref)``, times ``1 + lambda`` where positive
            (:func:`~learned_opt.unroll.unroll`'s ``reference``). Large gains on a few tasks
            then cannot pay for losses on others. Needs ``log_meta_loss`` and the ``"tbptt"``
            estimator; costs one unroll without meta-gradients per task.
        grad_checkpoint: gradient checkpointing in the unroll: keep only some inner states and
            recompute the inner steps' activations during the meta-backward. By default nested
            segments (:func:`~learned_opt.unroll.checkpoint_schedule`): O(log K) inner states and
            one step's activations alive instead of K steps', for ~L extra forward passes of the
            inner steps with L = ceil(log_8 K) levels (1 for K <= 8, 2 for K <= 64, 3 for
            K <= 512). Same meta-gradients; a run may be resumed with it switched on or off.
        grad_checkpoint_segment: the unroll's ``checkpoint_segment``: ``S`` (one level of
            segments of S steps: ~K / S states and S steps' activations, one extra forward
            pass) or nested segment lengths ``(S1, S2, ..., SL)``; ``None``:
            ``checkpoint_schedule(K)``. Only used with ``grad_checkpoint``.
        meta_lr: Adam learning rate of the meta-optimizer (times each of the learner's
            :meth:`~learned_opt.learners.MetaLearner.meta_param_groups` scales).
        meta_lr_schedule: ``"constant"``, or ``"cosine"``: the meta learning rate decays as
            ``(1 + cos(pi * i / iterations)) / 2`` at iteration ``i``, so that the weights a run
            ends with are not one noisy meta-step's. The schedule follows the configured
            ``iterations``: resuming with more iterations stretches what is left of it.
        meta_batch: tasks unrolled side by side per meta-update (over all processes); their
            window meta-losses are averaged.
        clip_grad: maximum meta-gradient norm (``0`` disables clipping).
        iterations: task batches to unroll (each gives ``ceil(T / K)`` meta-updates).
        time_budget: stop after this many seconds of training (``None``: no limit).
        eval_every: iterations between held-out evaluations (``0`` disables them).
        eval_tasks: held-out tasks per evaluation.
        eval_horizon: inner steps in evaluation (``None``: ``horizon``).
        eval_family: the named family of the held-out evaluation tasks, which select the
            weights kept as best (``None``: ``family``). A learned optimizer meant to transfer
            should be selected on tasks outside its meta-training distribution: selecting on
            tasks like the meta-training ones keeps improving in distribution while the transfer
            gets worse (README, issue 4).
        eval_family_kwargs: keyword arguments of ``eval_family``.
        checkpoint_every: iterations between checkpoints.
        keep_checkpoints: how many recent checkpoints to keep.
        max_loss_ratio: an inner loss above this multiple of its first value ends the unroll.
        rollback_after: after this many non-finite meta-steps in a row (each one skipped), roll
            back to the last good checkpoint and scale the meta learning rate by
            ``rollback_lr_factor``.
        rollback_lr_factor: see ``rollback_after``.
        seed: the seed of everything.
    """

    family: str = "quadratic"
    family_kwargs: dict[str, Any] = field(default_factory=dict)
    rule: str = "lstm"
    rule_kwargs: dict[str, Any] = field(default_factory=dict)
    init_weights: str | None = None
    horizon: int = 100
    min_horizon: int | None = None
    truncation: int = 20
    objective: str = "train"
    log_meta_loss: bool = False
    second_order: bool = False
    estimator: str = "tbptt"
    estimator_kwargs: dict[str, Any] = field(default_factory=dict)
    loss_aversion: float | None = None
    grad_checkpoint: bool = False
    grad_checkpoint_segment: int | tuple[int, ...] | None = None
    meta_lr: float = 1e-3
    meta_lr_schedule: str = "constant"
    meta_batch: int = 1
    clip_grad: float = 1.0
    iterations: int = 500
    time_budget: float | None = None
    eval_every: int = 50
    eval_tasks: int = 8
    eval_horizon: int | None = None
    eval_family: str | None = None
    eval_family_kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint_every: int = 10
    keep_checkpoints: int = 3
    max_loss_ratio: float | None = 1e3
    rollback_after: int = 3
    rollback_lr_factor: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"Invalid objective {self.objective!r}; expected one of {OBJECTIVES}")
        for name in ("horizon", "truncation", "meta_batch", "iterations", "eval_tasks"):
            if getattr(self, name) < 1:
                raise ValueError(f"Invalid {name}: {getattr(self, name)} (must be >= 1)")
        if self.meta_lr <= 0:
            raise ValueError(f"Invalid meta learning rate: {self.meta_lr}")
        if self.meta_lr_schedule not in META_LR_SCHEDULES:
            raise ValueError(
                f"Unknown meta_lr_schedule {self.meta_lr_schedule!r}; expected one of "
                f"{META_LR_SCHEDULES}"
            )
        if self.min_horizon is not None and not 1 <= self.min_horizon <= self.horizon:
            raise ValueError(
                f"Invalid min_horizon: {self.min_horizon} (must be in [1, horizon={self.horizon}])"
            )
        if self.estimator not in ESTIMATORS:
            raise ValueError(
                f"Unknown estimator {self.estimator!r}; expected one of {sorted(ESTIMATORS)}"
            )
        if self.estimator != "tbptt" and (self.grad_checkpoint or self.second_order):
            raise ValueError(
                f"grad_checkpoint and second_order apply to backpropagation only, not to the "
                f"{self.estimator!r} estimator (which never builds a graph)"
            )
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

    def build_estimator(self) -> Estimator:
        """The configured meta-gradient estimator."""
        kwargs = dict(self.estimator_kwargs)
        if self.estimator == "tbptt":
            kwargs.setdefault("checkpoint_segment", self.checkpoint_segment())
        return build_estimator(self.estimator, **kwargs)

    def task_horizon(self, iteration: int, index: int) -> int:
        """The horizon of task ``index`` of ``iteration``: ``horizon``, or a log-uniform draw
        from its own seed stream when ``min_horizon`` is set."""
        if self.min_horizon is None:
            return self.horizon
        seed = task_seed(self.seed, iteration, index) + _HORIZON_STREAM
        return sample_horizon(torch.Generator().manual_seed(seed), self.min_horizon, self.horizon)

    def checkpoint_segment(self) -> int | tuple[int, ...] | None:
        """The unroll's ``checkpoint_segment``: ``None`` without gradient checkpointing."""
        if not self.grad_checkpoint:
            return None
        return self.grad_checkpoint_segment or checkpoint_schedule(self.truncation)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MetaTrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def find_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Trainer checkpoints in ``ckpt_dir``, newest first."""
    return sorted(Path(ckpt_dir).glob("ckpt_*.pt"), reverse=True)


class _Progress:
    """A one-line progress report on stderr (no dependency on tqdm)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def update(self, it: int, text: str) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < (0.2 if self.tty else 10.0) and it < self.total:
            return
        self.last = now
        end = "" if self.tty and it < self.total else "\n"
        sys.stderr.write(f"\r[{it}/{self.total}] {text}" + end)
        sys.stderr.flush()


def _param_groups(learner: MetaLearner, meta_lr: float) -> list[dict[str, Any]]:
    """The Adam parameter groups of ``learner`` (see ``MetaLearner.meta_param_groups``)."""
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


class MetaTrainer:
    """Meta-trains a learner on a task family.

    Args:
        config: the run's configuration.
        log_dir: TensorBoard directory (``None``: no logging).
        ckpt_dir: checkpoint directory (``None``: no checkpoints).
        learner: the meta-learner; by default an :class:`OptimizerLearner` around the configured
            rule, initialized from ``config.seed``.
        family: the task family; by default ``make_family(config.family, **config.family_kwargs)``.
        eval_family: the family of the held-out evaluation tasks (e.g. a meta-test split with
            other classes); by default ``config.eval_family`` if set, else ``family``.
        progress: show a progress line on stderr.
    """

    def __init__(
        self,
        config: MetaTrainConfig,
        *,
        log_dir: str | Path | None = None,
        ckpt_dir: str | Path | None = None,
        learner: MetaLearner | None = None,
        family: TaskFamily | None = None,
        eval_family: TaskFamily | None = None,
        progress: bool = False,
    ) -> None:
        self.config = config
        self.family = family or make_family(config.family, **config.family_kwargs)
        if eval_family is None and config.eval_family is not None:
            eval_family = make_family(config.eval_family, **config.eval_family_kwargs)
        self.eval_family = eval_family or self.family
        if learner is None:
            if config.init_weights is not None:
                from . import pretrained

                rule, _ = load_rule(
                    pretrained.resolve(config.init_weights), expected_kind=config.rule
                )
            else:
                rule = build_rule(config.rule, config.rule_kwargs)
                if hasattr(rule, "reset_parameters"):
                    rule.reset_parameters(torch.Generator().manual_seed(config.seed))
            learner = OptimizerLearner(rule, second_order=config.second_order)
        self.learner = learner
        #: The frozen rule the run started from (the loss-averse objective's reference).
        self.reference: MetaLearner | None = None
        if config.loss_aversion is not None:
            self.reference = copy.deepcopy(learner)
            self.reference.requires_grad_(False)
        self.estimator = config.build_estimator()
        self.meta_opt = torch.optim.Adam(_param_groups(self.learner, config.meta_lr))
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else None
        self.progress = progress
        self.iteration = 0
        self.elapsed = 0.0
        self.best_metric = math.inf
        self.best_iteration = 0
        self.best_state = {k: v.detach().clone() for k, v in self.learner.state_dict().items()}
        self.history: dict[str, list[float]] = {"eval_iteration": [], "eval_metric": []}
        self.adam_baseline: dict[str, Any] | None = None
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.rollbacks = 0
        self._good: tuple[dict, dict] = self._snapshot()
        #: Free-form provenance kept in checkpoints (the CLI records each command line here).
        self.notes: dict[str, Any] = {"commands": []}
        self._writer: Any = None

    # ----------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The whole trainer state as plain data (loadable with ``weights_only=True``)."""
        state: dict[str, Any] = {
            "format": TRAINER_FORMAT,
            "config": self.config.to_dict(),
            "family": self.family.config(),
            "iteration": self.iteration,
            "elapsed": self.elapsed,
            "learner": self.learner.state_dict(),
            "best_learner": self.best_state,
            "best_metric": self.best_metric,
            "best_iteration": self.best_iteration,
            "meta_optimizer": self.meta_opt.state_dict(),
            "history": self.history,
            "adam_baseline": self.adam_baseline,
            "skipped_steps": self.skipped_steps,
            "rollbacks": self.rollbacks,
            "notes": self.notes,
        }
        if self.reference is not None:
            state["reference_learner"] = self.reference.state_dict()
        rule = getattr(self.learner, "rule", None)
        if rule is not None:
            meta = {"source": "meta_train", "iteration": self.iteration, "config": state["config"]}
            state["rule"] = rule_to_dict(rule, meta)
            best = build_rule(rule.kind, rule.config())
            best.load_state_dict({k[len("rule.") :]: v for k, v in self.best_state.items()})
            state["best_rule"] = rule_to_dict(
                best,
                {**meta, "eval_metric": self.best_metric, "best_iteration": self.best_iteration},
            )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the configuration must match this trainer's."""
        if not isinstance(state, dict) or state.get("format") != TRAINER_FORMAT:
            raise CheckpointError(f"Not a learned_opt trainer checkpoint (format {TRAINER_FORMAT})")
        saved = MetaTrainConfig.from_dict(state["config"])
        mine, theirs = self.config.to_dict(), saved.to_dict()
        # Settings that change neither the math nor the randomness of the run (checkpointing
        # recomputes the same values): a run may be resumed with other values of these.
        ignore = {
            "iterations",
            "time_budget",
            "eval_every",
            "checkpoint_every",
            "keep_checkpoints",
            "grad_checkpoint",
            "grad_checkpoint_segment",
        }
        diff = {k: (theirs[k], mine[k]) for k in mine if k not in ignore and mine[k] != theirs[k]}
        if diff:
            raise ValueError(f"Checkpoint configuration differs (saved, current): {diff}")
        self.learner.load_state_dict(state["learner"])
        if self.reference is not None:
            if "reference_learner" not in state:
                raise CheckpointError("The checkpoint has no reference learner (loss_aversion)")
            self.reference.load_state_dict(state["reference_learner"])
        self.meta_opt.load_state_dict(state["meta_optimizer"])
        self.iteration = int(state["iteration"])
        self.elapsed = float(state["elapsed"])
        self.best_state = state["best_learner"]
        self.best_metric = float(state["best_metric"])
        self.history = state["history"]
        self.best_iteration = int(state.get("best_iteration", -1))
        if self.best_iteration < 0:  # checkpoints written before best_iteration was recorded
            metrics = self.history.get("eval_metric", [])
            its = self.history.get("eval_iteration", [])
            self.best_iteration = its[int(np.argmin(metrics))] if metrics else 0
        self.adam_baseline = state["adam_baseline"]
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.notes = state.get("notes") or {"commands": []}
        self.rollbacks = int(state.get("rollbacks", 0))
        self.consecutive_skips = 0
        self._good = self._snapshot()

    def _snapshot(self) -> tuple[dict, dict]:
        return (copy.deepcopy(self.learner.state_dict()), copy.deepcopy(self.meta_opt.state_dict()))

    def _rollback(self) -> None:
        """Return to the last good checkpoint with a lower meta learning rate."""
        factor = self.config.rollback_lr_factor
        bases = [g.get("base_lr", g["lr"]) * factor for g in self.meta_opt.param_groups]
        learner_state, opt_state = self._good
        self.learner.load_state_dict(learner_state)
        self.meta_opt.load_state_dict(copy.deepcopy(opt_state))
        for group, base in zip(self.meta_opt.param_groups, bases):
            group["base_lr"] = base
        self._schedule_lr()
        lrs = [g["lr"] for g in self.meta_opt.param_groups]
        self.rollbacks += 1
        self.consecutive_skips = 0
        self._log("meta/rollbacks", self.rollbacks)
        self._log("meta/lr", lrs[0])
        warnings.warn(
            f"{self.config.rollback_after} non-finite meta-steps in a row at iteration "
            f"{self.iteration}: rolled back to the last good checkpoint, meta lr now {lrs[0]:.3g}",
            RuntimeWarning,
            stacklevel=2,
        )

    def save_checkpoint(self) -> Path | None:
        """Write ``ckpt_<iteration>.pt`` atomically, prune old ones, export ``best.pt``."""
        self._good = self._snapshot()
        if self.ckpt_dir is None or not distributed.is_main():
            return None
        path = self.ckpt_dir / f"ckpt_{self.iteration:08d}.pt"
        state = self.state_dict()
        atomic_save(state, path)
        if "best_rule" in state:
            atomic_save(state["best_rule"], self.ckpt_dir / "best.pt")
            atomic_save(state["rule"], self.ckpt_dir / "last.pt")
        for old in find_checkpoints(self.ckpt_dir)[self.config.keep_checkpoints :]:
            old.unlink(missing_ok=True)
        return path

    def resume(self, path: str | Path | None = None) -> bool:
        """Resume from ``path`` or from the newest readable checkpoint in ``ckpt_dir``.

        A truncated or corrupt newest checkpoint is reported with a warning and the one before
        it is used.

        Returns:
            whether a checkpoint was loaded.
        """
        candidates = [Path(path)] if path is not None else []
        if path is None and self.ckpt_dir is not None:
            candidates = find_checkpoints(self.ckpt_dir)
        for candidate in candidates:
            try:
                state = safe_load(candidate)
            except CheckpointError as exc:
                if path is not None:
                    raise
                warnings.warn(
                    f"Skipping unreadable checkpoint: {exc}", RuntimeWarning, stacklevel=2
                )
                continue
            self.load_state_dict(state)
            return True
        return False

    # ------------------------------------------------------------------------------ logging
    def _log(self, tag: str, value: float, step: int | None = None) -> None:
        if self.log_dir is None or not distributed.is_main():
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir))
            self._writer.add_text(
                "config", "```\n" + json.dumps(self.config.to_dict(), indent=2) + "\n```", 0
            )
        self._writer.add_scalar(tag, value, self.iteration if step is None else step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    # --------------------------------------------------------------------------- evaluation
    def _eval_seeds(self) -> list[int]:
        return [task_seed(self.config.seed, _EVAL_STREAM, k) for k in range(self.config.eval_tasks)]

    def _eval_horizon(self) -> int:
        return self.config.eval_horizon or self.config.horizon

    def _aggregate(self, values: list[float]) -> float:
        """The evaluation metric of per-task final losses: their mean, or with
        ``log_meta_loss`` their geometric mean; ``inf`` if any is not finite (or not positive)."""
        if not all(math.isfinite(v) for v in values):
            return math.inf
        if self.config.log_meta_loss:
            if min(values) <= 0:
                return math.inf
            return float(np.exp(np.mean(np.log(values))))
        return float(np.mean(values))

    def _metric_name(self) -> str:
        return "final_train_loss" if self.config.objective == "train" else "final_test_loss"

    def evaluate(self) -> tuple[float, np.ndarray]:
        """Mean final loss of the current rule on the held-out tasks, and the mean loss curve.

        A learner without a rule (MAML, a recurrent learner, ...) is evaluated by
        :meth:`evaluate_learner` instead.
        """
        if not hasattr(self.learner, "rule"):
            return self.evaluate_learner()
        rule = self.learner.rule

        def factory(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
            return LearnedOptimizer(params, rule, lr=lr)

        runs = [
            run_optimizer(self.eval_family, s, factory, 1.0, self._eval_horizon(), name="learned")
            for s in self._eval_seeds()
        ]
        values = [getattr(r, self._metric_name()) for r in runs]
        metric = self._aggregate(values)
        return metric, np.nanmean(np.array([r.losses for r in runs]), axis=0)

    def evaluate_learner(self) -> tuple[float, np.ndarray]:
        """Mean held-out loss of any learner on the held-out tasks, and the mean loss curve.

        Each task is unrolled for ``eval_horizon`` inner steps without meta-gradients and scored
        with :meth:`MetaLearner.evaluate` on its whole ``task.test`` (the query set of a few-shot
        task); the curve is the mean inner training loss per step (NaN after a divergence).
        """
        horizon = self._eval_horizon()
        values, curves = [], []
        for s in self._eval_seeds():
            task = self.eval_family.sample(torch.Generator().manual_seed(s))
            gen = torch.Generator().manual_seed(s + 1)
            windows = list(
                unroll(
                    self.learner,
                    task,
                    gen,
                    horizon=horizon,
                    truncation=horizon,
                    differentiable=False,
                )
            )
            with torch.no_grad():
                values.append(
                    float(self.learner.evaluate(task, windows[-1].state, task.test.full()))
                )
            curve = torch.cat([w.train_losses for w in windows]).tolist()
            curves.append(curve + [math.nan] * (horizon - len(curve)))
        metric = self._aggregate(values)
        return metric, np.nanmean(np.array(curves), axis=0)

    def baseline(self) -> dict[str, Any]:
        """Adam at the best learning rate of a grid, on the same held-out tasks (computed once)."""
        if self.adam_baseline is None:
            best: dict[str, Any] = {"metric": math.inf}
            for lr in DEFAULT_LR_GRID:
                runs = [
                    run_optimizer(
                        self.eval_family,
                        s,
                        lambda p, lr: torch.optim.Adam(p, lr=lr),
                        lr,
                        self._eval_horizon(),
                        name="adam",
                    )
                    for s in self._eval_seeds()
                ]
                vals = [getattr(r, self._metric_name()) for r in runs]
                metric = self._aggregate(vals)
                if metric < best["metric"]:
                    curve = np.nanmean(np.array([r.losses for r in runs]), axis=0)
                    best = {"metric": metric, "lr": lr, "curve": curve.tolist()}
            self.adam_baseline = best
        return self.adam_baseline

    def _run_eval(self) -> None:
        metric, curve = self.evaluate()
        self.history["eval_iteration"].append(self.iteration)
        self.history["eval_metric"].append(metric)
        self._log("eval/metric", metric)
        if metric < self.best_metric:
            self.best_metric = metric
            self.best_iteration = self.iteration
            self.best_state = {k: v.detach().clone() for k, v in self.learner.state_dict().items()}
        self._log("eval/best_metric", self.best_metric)
        if not hasattr(self.learner, "rule"):
            return  # the tuned-Adam baseline compares update rules only
        adam = self.baseline()
        self._log("eval/adam_tuned_metric", adam["metric"])
        self._log("eval/adam_tuned_lr", adam["lr"])
        self._log("eval/ratio_vs_adam", metric / adam["metric"])
        if self._writer is not None:
            for t, (mine, theirs) in enumerate(zip(curve, adam["curve"])):
                self._writer.add_scalars(
                    f"eval_curves/iter_{self.iteration:07d}",
                    {"learned": float(mine), "adam_tuned": float(theirs)},
                    t,
                )

    # ------------------------------------------------------------------------------ training
    def _meta_step(
        self, grads: list[torch.Tensor | None] | None, meta_loss: float
    ) -> tuple[float, float, bool]:
        """One meta-step from this process's mean meta-gradient ``grads`` (``None``: no usable
        window here) and mean meta-loss (``0.0`` when ``grads`` is ``None``)."""
        self.meta_opt.zero_grad(set_to_none=True)
        if grads is not None:
            set_gradients(self.learner, grads)
        # else (distributed runs only): this rank's tasks all diverged; it contributes zeros
        if distributed.world_size() > 1:  # average the meta-gradient over ranks (same on all)
            for p in self.learner.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            distributed.all_reduce_mean([p.grad for p in self.learner.parameters()])
        params = [p for p in self.learner.parameters() if p.grad is not None]
        max_norm = self.config.clip_grad if self.config.clip_grad > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
        # The norm is computed after the all-reduce, so every rank takes the same decision.
        local_ok = distributed.world_size() > 1 or math.isfinite(meta_loss)
        if not (math.isfinite(norm) and local_ok):
            self.meta_opt.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.consecutive_skips += 1
            if self.consecutive_skips >= self.config.rollback_after:
                self._rollback()
            return meta_loss, norm, False
        self.consecutive_skips = 0
        self._schedule_lr()
        self.meta_opt.step()
        return meta_loss, norm, True

    def _schedule_lr(self) -> None:
        """Set each group's learning rate from its base and the schedule at this iteration."""
        factor = 1.0
        if self.config.meta_lr_schedule == "cosine":
            done = min(self.iteration / self.config.iterations, 1.0)
            factor = 0.5 * (1.0 + math.cos(math.pi * done))
        for group in self.meta_opt.param_groups:
            # Checkpoints from before schedules have no base_lr: their lr is the base.
            group["lr"] = group.setdefault("base_lr", group["lr"]) * factor

    def train_iteration(self) -> dict[str, float]:
        """Unroll one batch of tasks and take one meta-step per truncation window.

        Each task's unroll is a stream of per-window meta-gradient estimates from the configured
        estimator; round after round, the next window of every task still running is taken, and
        the mean of their estimates makes one meta-step.
        """
        cfg = self.config
        world = distributed.world_size()
        if cfg.meta_batch % world:
            raise ValueError(
                f"meta_batch={cfg.meta_batch} must be a multiple of the number of processes "
                f"({world}): each process unrolls meta_batch / {world} of the tasks"
            )
        horizons = [cfg.task_horizon(self.iteration, j) for j in range(cfg.meta_batch)]
        # meta_batch is global: rank r unrolls tasks r, r + N, r + 2N, ... of the iteration, so
        # any number of processes meta-trains on exactly the same tasks (and can resume the same
        # checkpoint).
        streams = []
        for j in range(distributed.rank(), cfg.meta_batch, world):
            seed = task_seed(cfg.seed, self.iteration, j)
            task = self.family.sample(torch.Generator().manual_seed(seed))
            streams.append(
                self.estimator.unroll(
                    self.learner,
                    task,
                    torch.Generator().manual_seed(seed + 1),
                    horizon=horizons[j],
                    truncation=cfg.truncation,
                    objective=cfg.objective,
                    max_loss_ratio=cfg.max_loss_ratio,
                    log_meta_loss=cfg.log_meta_loss,
                    reference=self.reference,
                    loss_aversion=cfg.loss_aversion or 0.0,
                )
            )
        meta_losses, norms, diverged = [], [], 0
        active = list(streams)
        # A fixed number of rounds (that of the longest task of the whole iteration), so every
        # rank joins the same number of all-reduces; tasks that end early drop out.
        for _ in range(math.ceil(max(horizons) / cfg.truncation)):
            estimates = []
            for s in list(active):
                e = next(s, None)
                if e is None:
                    active.remove(s)
                    continue
                estimates.append(e)
                diverged += e.diverged
            grads = average_gradients(estimates)
            if grads is not None or world > 1:
                usable = [e.meta_loss for e in estimates if e.grads is not None]
                loss, norm, _ = self._meta_step(grads, float(np.mean(usable)) if usable else 0.0)
                meta_losses.append(loss)
                norms.append(norm)
        return {
            "meta_loss": float(np.mean(meta_losses)) if meta_losses else math.nan,
            "grad_norm": float(np.mean(norms)) if norms else math.nan,
            "diverged": float(diverged),
            "inner_steps": float(sum(horizons)),
        }

    def train(self, on_iteration: Callable[[MetaTrainer, dict], None] | None = None) -> None:
        """Run until ``config.iterations`` or ``config.time_budget`` is reached.

        Evaluates every ``eval_every`` iterations (on that schedule only, so that a resumed run
        evaluates exactly where an uninterrupted one would), keeps the best rule by that
        evaluation, checkpoints every ``checkpoint_every`` iterations and at the end.
        """
        cfg = self.config
        bar = _Progress(cfg.iterations, self.progress)
        if self.iteration == 0 and cfg.eval_every:
            self._run_eval()
        while self.iteration < cfg.iterations:
            if cfg.time_budget is not None and self.elapsed >= cfg.time_budget:
                break
            start = time.perf_counter()
            stats = self.train_iteration()
            self.iteration += 1
            seconds = time.perf_counter() - start
            # Ranks agree on the clock (the slowest one), so they stop at the same iteration.
            self.elapsed += distributed.all_reduce_max(seconds)
            self._log("meta/loss", stats["meta_loss"])
            self._log("meta/grad_norm", stats["grad_norm"])
            self._log("meta/lr", self.meta_opt.param_groups[0]["lr"])
            self._log("meta/diverged_tasks", stats["diverged"])
            self._log("meta/skipped_steps", self.skipped_steps)
            self._log("time/inner_steps_per_second", stats["inner_steps"] / seconds)
            if cfg.eval_every and self.iteration % cfg.eval_every == 0:
                self._run_eval()
            if self.iteration % cfg.checkpoint_every == 0:
                self.save_checkpoint()
            best = f" best_eval={self.best_metric:.4g}" if math.isfinite(self.best_metric) else ""
            bar.update(self.iteration, f"meta_loss={stats['meta_loss']:.4g}{best}")
            if on_iteration is not None:
                on_iteration(self, stats)
        self.save_checkpoint()
        if self._writer is not None:
            self._writer.flush()

    def export_best(self, path: str | Path, metadata: dict[str, Any] | None = None) -> None:
        """Write the best rule (by held-out evaluation) as a weights file with ``metadata``."""
        record = self.state_dict()["best_rule"]
        record["metadata"].update(metadata or {})
        atomic_save(record, path)
