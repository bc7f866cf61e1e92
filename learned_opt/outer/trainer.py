"""The outer loop: meta-optimizer, clipping, evaluation, logging, checkpoints, resume.

One trainer trains any :class:`~learned_opt.learners.MetaLearner`. Randomness is a pure function
of ``(seed, iteration, task index)``, so a resumed run repeats exactly what an uninterrupted run
would have done; under ``torchrun`` every process unrolls its share of the tasks and the
meta-gradients are averaged over processes (:mod:`learned_opt.distributed`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import distributed
from ..checkpoint import CheckpointError, atomic_save, check_saveable
from ..files import plain_data
from ..learners import MetaLearner
from ..rules import UpdateRule
from ..tasks import TaskFamily
from . import checkpoints, factory
from .config import MetaTrainConfig
from .held_out import HeldOut
from .rounds import take_rounds, write_meta_gradient

__all__ = ["MetaTrainer"]


def _check_world(meta_batch: int) -> int:
    """The number of processes, checked to divide ``meta_batch``."""
    world = distributed.world_size()
    if meta_batch % world:
        raise ValueError(
            f"meta_batch={meta_batch} must be a multiple of the number of processes "
            f"({world}): each process unrolls meta_batch / {world} of the tasks"
        )
    return world


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


def _over_processes(stats: dict[str, float]) -> dict[str, float]:
    """An iteration's statistics over every process's tasks (each process unrolls its share):
    the meta-loss as one process would have it (each round's mean over every process's usable
    windows, averaged over the rounds that had one: a process whose tasks had ended takes part
    in later rounds with none), the sum of their diverged tasks. The gradient norm and the inner
    steps are the same on every process already."""
    if distributed.world_size() == 1:
        return stats
    sums, windows = stats["round_loss_sums"], stats["round_windows"]  # (the same rounds on
    parts = torch.tensor([stats["diverged"], *sums, *windows], dtype=torch.float64)  # each)
    distributed.all_reduce_sum([parts])
    total, count = parts[1 : 1 + len(sums)], parts[1 + len(sums) :]
    used = count > 0
    loss = float((total[used] / count[used]).mean()) if bool(used.any()) else math.nan
    return {
        **stats,
        "meta_loss": loss,
        "diverged": float(parts[0]),
        "round_loss_sums": total.tolist(),
        "round_windows": count.tolist(),
    }


def _unwritable(*folders: Path | None) -> str | None:
    """What keeps the first of ``folders`` that cannot be created or written from it (a file in
    its place, a read-only or full disk), else ``None``."""
    for folder in folders:
        if folder is None:
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:
            return f"Cannot write in {folder}: {exc.strerror or exc}"
    return None


def _check_types(learner: Any, family: Any, eval_family: Any) -> None:
    """A ``TypeError`` for a learner or task family given that is none (a rule given as the
    learner, a family's name given as the family)."""
    if learner is not None and not isinstance(learner, MetaLearner):
        hint = "; wrap a rule: OptimizerLearner(rule)" if isinstance(learner, UpdateRule) else ""
        raise TypeError(f"learner must be a MetaLearner, not a {type(learner).__name__}{hint}")
    for name, value in (("family", family), ("eval_family", eval_family)):
        if value is not None and not isinstance(value, TaskFamily):
            raise TypeError(
                f"{name} must be a TaskFamily, not a {type(value).__name__} (make_family(name) "
                "builds a named one; or set the configuration's family / eval_family)"
            )


def _check_own_learner(config: MetaTrainConfig, learner: MetaLearner) -> None:
    """A ``ValueError`` where ``config`` sets what only the learner it would build reads, for a
    learner given instead (it would be ignored, and recorded as if it had applied)."""
    for name in ("init_weights", "rule_kwargs"):
        if getattr(config, name):
            raise ValueError(
                f"{name} configures the rule the configuration builds; a learner of your own "
                "brings its rule: leave it out"
            )
    if config.train_only:
        raise ValueError(
            "train_only selects the parameters of the rule the configuration builds; with a "
            "learner of your own, fix the parameters not to train with requires_grad_(False)"
        )
    steps = getattr(learner, "inner_steps", None)  # (MAML's: the adaptation it stands for)
    if steps is not None and (
        config.horizon != steps
        or config.min_horizon is not None
        or config.eval_horizon not in (None, steps)
    ):
        raise ValueError(
            f"the learner adapts in inner_steps={steps} steps, and the meta-trainer unrolls "
            f"horizon={config.horizon} (min_horizon={config.min_horizon}, eval_horizon="
            f"{config.eval_horizon}): set horizon={steps} and truncation={steps} in the "
            f"configuration, or inner_steps={config.horizon} on the learner"
        )
    if config.second_order and not getattr(learner, "second_order", False):
        raise ValueError(
            "second_order configures the learner the configuration builds; with a learner of "
            "your own, set it there (OptimizerLearner(rule, second_order=True); MAML: "
            "MAMLLearner(model, first_order=False))"
        )


class MetaTrainer:
    """Meta-trains a learner on a task family.

    Args:
        config: the run's configuration.
        log_dir: TensorBoard directory (``None``: no logging).
        ckpt_dir: checkpoint directory (``None``: no checkpoints).
        learner: the meta-learner; by default an :class:`OptimizerLearner` around the configured
            rule (:func:`~learned_opt.outer.factory.build_learner`). The configuration's
            ``train_only`` and ``second_order`` configure that default: with a learner given,
            they are refused (set them on the learner).
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
        _check_world(config.meta_batch)  # at the start, not after the first evaluation
        _check_types(learner, family, eval_family)
        if learner is not None:
            _check_own_learner(config, learner)
            if (rule := getattr(learner, "rule", None)) is not None:
                check_saveable(rule)  # (checkpoints and exports hold it: before any work)
        self.config = config
        self.family = family or factory.build_family(config)
        self.eval_family = eval_family or factory.build_eval_family(config, self.family)
        for name, tasks in (("family", self.family), ("eval_family", self.eval_family)):
            plain_data(tasks.config(), f"the {name}'s config")  # checkpoints hold it: at start
        self.learner = learner if learner is not None else factory.build_learner(config, ckpt_dir)
        if not any(p.requires_grad for p in self.learner.parameters()):
            raise ValueError(
                f"The {type(self.learner).__name__} has no parameter to meta-train (none, or "
                "all fixed with requires_grad=False)"
            )
        #: The frozen rule the run started from (the loss-averse objective's reference).
        self.reference: MetaLearner | None = factory.build_reference(config, self.learner)
        self.estimator = factory.build_estimator(config)
        self.meta_opt = factory.build_meta_optimizer(config, self.learner)
        self.held_out = HeldOut(config, self.eval_family)
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
        self._log_opened = False  # whether this trainer has opened its TensorBoard writer
        self._purge_step: int | None = None  # a resumed run's first step of its own
        self._checkpointed = False  # whether this trainer has written a checkpoint
        #: The state of the last completed iteration that no checkpoint holds yet.
        self._unsaved: dict[str, Any] | None = None
        self._lock: Path | None = None  # the checkpoint directory's, while train() runs
        self._stopped_by: BaseException | None = None  # what ended train(), if anything

    # ----------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The whole trainer state as plain data (loadable with ``weights_only=True``)."""
        return checkpoints.trainer_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the configuration must match this trainer's."""
        checkpoints.restore_trainer(self, state)  # (the rollback point too, where it has one)
        self._purge_step = self.iteration + 1

    def _snapshot(self) -> tuple[dict, dict]:
        return (copy.deepcopy(self.learner.state_dict()), copy.deepcopy(self.meta_opt.state_dict()))

    def save_checkpoint(self, rollback_point: bool = True) -> Path | None:
        """Write ``ckpt_<iteration>.pt`` atomically, prune old ones, export ``best.pt``. With
        ``rollback_point`` (the periodic checkpoints, every ``checkpoint_every`` iterations)
        the state is also the one a rollback returns to; the checkpoint holds that point, so
        that a run resumed from any checkpoint rolls back where an uninterrupted one would."""
        if rollback_point:
            self._good = self._snapshot()
        self._checkpointed = True
        if self.ckpt_dir is None or not distributed.is_main():
            return None
        return checkpoints.write_checkpoint(
            self.ckpt_dir, self.state_dict(), self.config.keep_checkpoints
        )

    def resume(self, path: str | Path | None = None) -> bool:
        """Resume from ``path`` or from the newest readable checkpoint in ``ckpt_dir`` (a
        truncated, corrupt or malformed newest checkpoint, e.g. one with non-finite weights, is
        reported with a warning and the one before it is used). Returns whether a checkpoint
        was loaded.

        Under ``torchrun`` rank 0 reads the checkpoint (only rank 0 writes them) and sends it to
        the other processes: machines without a shared filesystem resume the same state.

        Raises:
            CheckpointError: ``path`` is unreadable, or none of ``ckpt_dir``'s checkpoints can
                be resumed (they are left as they are), on every process.
        """
        state = None
        if distributed.is_main():
            try:
                check = functools.partial(checkpoints.check_state, self)
                state = checkpoints.read_checkpoint(path, self.ckpt_dir, check)
            except CheckpointError as exc:  # raised on every process, not on rank 0 alone
                state = {"unreadable": str(exc)}
        state = distributed.broadcast_state(state)
        if isinstance(state, dict) and set(state) == {"unreadable"}:
            raise CheckpointError(state["unreadable"])
        if state is not None:
            self.load_state_dict(state)
        return state is not None

    def check_outputs(self) -> None:
        """Refuses, before any work, what would fail or lose data at the first write: a
        checkpoint or log directory that cannot be written, and a run that did not resume
        writing into a checkpoint directory holding an earlier run's checkpoints (its writes
        would prune them and replace ``best.pt``). :meth:`train` calls it first.

        Raises:
            FileExistsError: an earlier run's checkpoints (on every process).
            OSError: a directory that cannot be created or written (on every process).
        """
        self._check_ranks_agree()
        problem = None  # (whether an earlier run's checkpoints, the message): rank 0 decides
        if distributed.is_main():
            fresh = self.iteration == 0 and self._purge_step is None and not self._checkpointed
            if message := _unwritable(self.log_dir, self.ckpt_dir):
                problem = (False, message)
            elif fresh and self.ckpt_dir and (found := checkpoints.find_checkpoints(self.ckpt_dir)):
                problem = (
                    True,
                    f"{self.ckpt_dir} holds checkpoints of an earlier run ({found[0].name}, "
                    "newest): resume it (trainer.resume(), --resume), or start this run in "
                    "another checkpoint directory; a new run there would prune them and "
                    "replace best.pt",
                )
            elif self.ckpt_dir and self._lock is None:
                try:  # while it trains, no other run writes there (run started alike)
                    self._lock = checkpoints.hold_directory(self.ckpt_dir)
                except FileExistsError as exc:
                    problem = (True, str(exc))
        problem = distributed.broadcast_state(problem)
        if problem is not None:
            earlier_run, message = problem
            raise (FileExistsError if earlier_run else OSError)(message)

    def _check_ranks_agree(self) -> None:
        """Under ``torchrun``, a ``ValueError`` on every process unless all were given rank
        0's configuration (command lines that differ between machines: the ranks would train
        apart, or stall in mismatched collectives)."""
        if distributed.world_size() < 2:
            return
        ours = json.dumps(self.config.to_dict(), sort_keys=True, default=str)
        mine, theirs = json.loads(ours), json.loads(distributed.broadcast_state(ours))
        differ = sorted(k for k in mine if mine[k] != theirs.get(k))
        if distributed.all_reduce_max(float(bool(differ))):
            where = f"this process's {differ}" if differ else "another process's settings"
            raise ValueError(
                f"the processes of this run were given different configurations ({where} "
                f"differ from rank 0's): start every process with the same settings"
            )

    def export_best(self, path: str | Path, metadata: dict[str, Any] | None = None) -> None:
        """Write the best rule (by held-out evaluation) as a weights file with ``metadata``.

        Raises:
            ValueError: the learner has no update rule (MAML, a black-box learner): its best
                weights are the checkpoints' ``best_learner``.
        """
        state = self.state_dict()
        if "best_rule" not in state:
            raise ValueError(
                f"export_best writes an update rule; a {type(self.learner).__name__} has none "
                "(its best weights are the checkpoints' 'best_learner', or "
                "trainer.best_state)"
            )
        record = state["best_rule"]
        record["metadata"].update(metadata or {})
        atomic_save(record, path)

    # ------------------------------------------------------------------------------ logging
    def _log(self, tag: str, value: float, step: int | None = None) -> None:
        if self.log_dir is None or not distributed.is_main():
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # A session's first writer marks its start: resumed, TensorBoard hides the events
            # the interrupted run logged after its checkpoint (from the resumed run's first
            # step on), so that each step shows once. (It takes a run's first start mark for
            # the initial one and purges at the later ones: a fresh run marks step 0; a writer
            # opened again after close() marks nothing.) The configuration is logged at the
            # session's first step, with what a resume may change (the iterations, say).
            start = self._purge_step or 0
            purge = None if self._log_opened else start
            self._writer = SummaryWriter(str(self.log_dir), purge_step=purge)
            if not self._log_opened:
                config = json.dumps(self.config.to_dict(), indent=2)
                self._writer.add_text("config", "```\n" + config + "\n```", start)
            self._log_opened = True
        self._writer.add_scalar(tag, value, self.iteration if step is None else step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    # --------------------------------------------------------------------------- evaluation
    def evaluate(self) -> tuple[float, np.ndarray]:
        """The held-out metric of the current learner and its mean loss curve
        (:class:`~learned_opt.outer.held_out.HeldOut`)."""
        return self.held_out.evaluate(self.learner)

    def _run_eval(self) -> None:
        metric, curve = self.evaluate()
        self.history["eval_iteration"].append(self.iteration)
        self.history["eval_metric"].append(metric)
        self._log("eval/metric", metric)
        for part, value in self.held_out.parts.items():  # told and untold, when both ran
            self._log(f"eval/metric_{part}", value)
        if metric < self.best_metric:
            self.best_metric = metric
            self.best_iteration = self.iteration
            self.best_state = {k: v.detach().clone() for k, v in self.learner.state_dict().items()}
        self._log("eval/best_metric", self.best_metric)
        if not hasattr(self.learner, "rule"):
            return  # the tuned-Adam baseline compares update rules only
        if self.adam_baseline is None:  # the same tasks every time: computed once
            self.adam_baseline = self.held_out.adam_baseline()
        adam = self.adam_baseline
        self._log("eval/adam_tuned_metric", adam["metric"])
        self._log("eval/adam_tuned_lr", adam["lr"])
        self._log("eval/ratio_vs_adam", metric / adam["metric"])
        if self._writer is not None:
            tag = f"eval_curves/iter_{self.iteration:07d}"
            if self.iteration >= (self._purge_step or 0):
                # An earlier run's curve of this iteration in this log directory (the
                # interrupted run's, resumed; any, for a fresh run: the writer purged from step
                # 0), in add_scalars' own event files, which purge_step does not reach, gives
                # way to this one.
                for name in ("learned", "adam_tuned"):
                    stale = Path(self._writer.log_dir) / f"{tag.replace('/', '_')}_{name}"
                    for events in stale.glob("events.out.tfevents.*"):
                        events.unlink(missing_ok=True)
            for t, (mine, theirs) in enumerate(zip(curve, adam["curve"])):
                self._writer.add_scalars(
                    tag, {"learned": float(mine), "adam_tuned": float(theirs)}, t
                )

    # ------------------------------------------------------------------------------ training
    def _meta_step(
        self, grads: list[torch.Tensor | None] | None, meta_loss: float, count: int
    ) -> tuple[float, bool]:
        """One meta-step from this process's mean meta-gradient ``grads`` over ``count`` usable
        windows (``None``: none here) and mean meta-loss (``0.0`` when ``grads`` is ``None``).
        A non-finite one is skipped, and after ``rollback_after`` in a row the run rolls back;
        with no usable window in any process there is no step. Returns the gradient norm and
        whether the meta-optimizer stepped."""
        norm = write_meta_gradient(self.learner, self.meta_opt, grads, self.config.clip_grad, count)
        if norm is None:
            return math.nan, False
        # The norm is computed after the all-reduce, so every rank takes the same decision.
        local_ok = distributed.world_size() > 1 or math.isfinite(meta_loss)
        if not (math.isfinite(norm) and local_ok):
            self.meta_opt.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.consecutive_skips += 1
            if self.consecutive_skips >= self.config.rollback_after:
                self._rollback()
            return norm, False
        self.consecutive_skips = 0
        self._schedule_lr()
        self.meta_opt.step()
        return norm, True

    def _schedule_lr(self) -> None:
        """Set each group's learning rate from its base and the schedule at this iteration."""
        factor = 1.0
        if self.config.meta_lr_schedule == "cosine":
            done = min(self.iteration / self.config.iterations, 1.0)
            factor = 0.5 * (1.0 + math.cos(math.pi * done))
        for group in self.meta_opt.param_groups:
            # Checkpoints from before schedules have no base_lr: their lr is the base.
            group["lr"] = group.setdefault("base_lr", group["lr"]) * factor

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
        # At the iteration under way (its meta/lr, logged when it ends, is the lowered one).
        self._log("meta/rollbacks", self.rollbacks, step=self.iteration + 1)
        warnings.warn(
            f"{self.config.rollback_after} non-finite meta-steps in a row at iteration "
            f"{self.iteration + 1}: rolled back to the last good checkpoint, meta lr now "
            f"{lrs[0]:.3g}",
            RuntimeWarning,
            stacklevel=3,
        )

    def train_iteration(self) -> dict[str, float]:
        """Unroll one batch of tasks and take one meta-step per round of truncation windows
        (:func:`~learned_opt.outer.rounds.take_rounds`).

        ``meta_batch`` is global: rank r unrolls tasks r, r + N, r + 2N, ... of the iteration,
        so any number of processes meta-trains on exactly the same tasks (and can resume the
        same checkpoint). Every rank takes the same number of rounds, that of the longest task
        of the iteration; tasks that end early drop out.
        """
        cfg = self.config
        world = _check_world(cfg.meta_batch)
        horizons = [cfg.task_horizon(self.iteration, j) for j in range(cfg.meta_batch)]
        streams = []
        for j in range(distributed.rank(), cfg.meta_batch, world):
            task_generator, generator = cfg.task_generators(self.iteration, j)
            task = self.family.sample(task_generator)
            spec = cfg.unroll_spec(horizons[j], cfg.task_told(self.iteration, j))
            streams.append(
                self.estimator.unroll(self.learner, task, generator, spec, reference=self.reference)
            )
        stats = take_rounds(
            streams,
            self._meta_step,
            rounds=math.ceil(max(horizons) / cfg.truncation),
            step_without_gradient=world > 1,
            clip_each=cfg.clip_grad if cfg.clip_grad_per_task else 0.0,
        )
        return {
            "meta_loss": stats["meta_loss"],
            "grad_norm": stats["grad_norm"],
            "diverged": stats["diverged"],
            "inner_steps": float(sum(horizons)),
            "round_loss_sums": stats["round_loss_sums"],
            "round_windows": stats["round_windows"],
        }

    def train(self, on_iteration: Callable[[MetaTrainer, dict], None] | None = None) -> None:
        """Run until ``config.iterations`` or ``config.time_budget`` is reached.

        Evaluates every ``eval_every`` iterations (on that schedule only, so that a resumed run
        evaluates exactly where an uninterrupted one would), keeps the best rule by that
        evaluation, checkpoints every ``checkpoint_every`` iterations and at the end.

        Interrupted (Ctrl-C, ``SIGTERM`` as ``kill``, ``torchrun`` and job schedulers send it,
        or any exception), the run writes its last completed iteration as a checkpoint before
        the exception goes on, so that a resume loses no finished iteration; a ``SIGTERM``
        then ends the process with exit status 143. (The state of a completed iteration not
        yet checkpointed is held in memory for that; ``SIGTERM`` is caught only where it has
        its default action, in the main thread.)
        """
        self.check_outputs()
        try:
            self._train_held(on_iteration)
        finally:
            if self._lock is not None:
                checkpoints.release_directory(self._lock)
                self._lock = None

    def _train_held(self, on_iteration: Callable[[MetaTrainer, dict], None] | None) -> None:
        self._unsaved = None
        self._stopped_by = None
        try:
            with _terminate_as_exit():
                self._train(on_iteration)
        except BaseException as exc:
            self._stopped_by = exc
            terminated_already = isinstance(exc, SystemExit) and exc.code == _TERMINATED
            # A SIGTERM during the write (torchrun's, as another rank failed) waits for it; one
            # after the SIGTERM that stopped the run kills at once.
            with _terminate_deferred(not terminated_already) as terminated:
                self._save_interrupted(exc)
            if terminated and not terminated_already:
                raise SystemExit(_TERMINATED) from exc
            raise

    def _train(self, on_iteration: Callable[[MetaTrainer, dict], None] | None) -> None:
        cfg = self.config
        bar = _Progress(cfg.iterations, self.progress)
        if self.iteration == 0 and cfg.eval_every and not self._evaluated():
            start = time.perf_counter()
            self._run_eval()  # counted in the budget too (it tunes Adam's baseline)
            self.elapsed += distributed.all_reduce_max(time.perf_counter() - start)
        while self.iteration < cfg.iterations:
            if cfg.time_budget is not None and self.elapsed >= cfg.time_budget:
                break
            start = time.perf_counter()
            stats = _over_processes(self.train_iteration())
            self.iteration += 1
            if not math.isfinite(stats["meta_loss"]) and distributed.is_main():
                warnings.warn(
                    f"iteration {self.iteration}: no task gave a usable meta-loss (every one "
                    f"diverged or was not finite, {stats['diverged']:.0f} of them): no "
                    "meta-step. Check the tasks (their data, the losses at the rule's start)",
                    RuntimeWarning,
                    stacklevel=3,
                )
            seconds = time.perf_counter() - start
            self._log("meta/loss", stats["meta_loss"])
            self._log("meta/grad_norm", stats["grad_norm"])
            self._log("meta/lr", self.meta_opt.param_groups[0]["lr"])
            self._log("meta/diverged_tasks", stats["diverged"])
            self._log("meta/skipped_steps", self.skipped_steps)
            self._log("time/inner_steps_per_second", stats["inner_steps"] / seconds)
            if cfg.eval_every and self.iteration % cfg.eval_every == 0:
                self._run_eval()
            # The budget counts the evaluations too (what the run costs). Ranks agree on the
            # clock (the slowest one), so they stop at the same iteration.
            self.elapsed += distributed.all_reduce_max(time.perf_counter() - start)
            if self.iteration % cfg.checkpoint_every == 0:
                self.save_checkpoint()
                self._unsaved = None
            else:
                self._hold_unsaved()
            best = f" best_eval={self.best_metric:.4g}" if math.isfinite(self.best_metric) else ""
            bar.update(self.iteration, f"meta_loss={stats['meta_loss']:.4g}{best}")
            if on_iteration is not None:
                on_iteration(self, stats)
        if self.iteration >= cfg.iterations and cfg.eval_every and not self._evaluated():
            # (Not evaluated here: a run lengthened on resume then goes on as an uninterrupted
            # one would, whose evaluations are every eval_every iterations.)
            warnings.warn(
                f"the run ended at iteration {self.iteration}, which no held-out evaluation "
                f"scored (every {cfg.eval_every}): its best weights (best.pt, --export) are "
                f"those of iteration {self.best_iteration}, chosen among the evaluated ones. "
                "Make iterations a multiple of eval_every, or export the last weights "
                "(learned-opt export --which latest)",
                RuntimeWarning,
                stacklevel=3,
            )
        self.save_checkpoint(rollback_point=self.iteration % cfg.checkpoint_every == 0)
        self._unsaved = None
        if self._writer is not None:
            self._writer.flush()

    def _evaluated(self) -> bool:
        """Whether the held-out evaluation has scored the current iteration's weights."""
        return self.history["eval_iteration"][-1:] == [self.iteration]

    def _hold_unsaved(self) -> None:
        """Keep a copy of the state of the iteration just completed, which no checkpoint holds
        yet (on the process that writes checkpoints; its tensors in CPU memory): an
        interruption writes it."""
        if self.ckpt_dir is not None and distributed.is_main():
            self._unsaved = _copy_to_cpu(self.state_dict())

    def _save_interrupted(self, exc: BaseException) -> None:
        """Write the last completed iteration not yet checkpointed, as ``exc`` ends the run."""
        state, self._unsaved = self._unsaved, None
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.flush()
        if state is None:
            return
        ours = self.ckpt_dir / f"ckpt_{self.iteration:08d}.pt"
        if self.iteration > state["iteration"] and ours.is_file():
            # Interrupted while writing this iteration's checkpoint (its best.pt, say): the
            # state is still that iteration's, written again whole.
            state = self.state_dict()
        if isinstance(exc, KeyboardInterrupt):
            what = "was interrupted (KeyboardInterrupt)"
        elif isinstance(exc, SystemExit):
            what = f"was stopped (SystemExit {exc.code})"
        else:
            what = f"failed ({type(exc).__name__}: {exc})"
        try:
            path = checkpoints.write_checkpoint(self.ckpt_dir, state, self.config.keep_checkpoints)
        except Exception as failure:  # (a full disk, say): the original exception goes on
            warnings.warn(
                f"The run {what}, and its last completed iteration ({state['iteration']}) "
                f"could not be saved: {failure}",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        self._checkpointed = True
        warnings.warn(
            f"The run {what}: its last completed iteration ({state['iteration']}) is saved "
            f"as {path}; resume it with trainer.resume() (learned-opt meta-train --resume)",
            RuntimeWarning,
            stacklevel=3,
        )


#: The exit status of a process that ``SIGTERM`` stopped (128 + the signal's number).
_TERMINATED = 128 + signal.SIGTERM


def _sigterm_free() -> bool:
    """Whether this thread may handle ``SIGTERM``: the main thread, where it still has its
    default action (no handler of the user's or of another library)."""
    return (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    )


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """``SIGTERM`` raises ``SystemExit(143)`` inside the block (where it has its default action,
    in the main thread), so that the run saves its last completed iteration; a second one kills
    the process as before."""
    if not _sigterm_free():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise SystemExit(_TERMINATED)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is terminate:  # (not one set in the meantime)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _terminate_deferred(enabled: bool = True) -> Iterator[list[int]]:
    """With ``enabled``, a first ``SIGTERM`` only recorded inside the block (where it has its
    default action, in the main thread): the last completed iteration's write is not cut short
    by it; a second kills the process. Yields the list of signals received."""
    received: list[int] = []
    if not (enabled and _sigterm_free()):
        yield received
        return

    def record(signum: int, frame: Any) -> None:
        received.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, record)
    try:
        yield received
    finally:
        if signal.getsignal(signal.SIGTERM) is record:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _copy_to_cpu(state: Any) -> Any:
    """A deep copy of ``state`` (plain data and tensors) with every tensor in CPU memory: its
    device tensors moved first (each object once), then the whole copied as ``deepcopy`` copies
    (tensors sharing storage still share it; state dicts keep their metadata)."""
    moved: dict[int, Any] = {}

    def to_cpu(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            if x.device.type == "cpu":
                return x
            if id(x) not in moved:
                moved[id(x)] = x.detach().cpu()
            return moved[id(x)]
        if isinstance(x, dict):
            out = copy.copy(x)  # (its type and attributes, e.g. a state dict's _metadata)
            for k, v in x.items():
                out[k] = to_cpu(v)
            return out
        if isinstance(x, list):
            return [to_cpu(v) for v in x]
        if isinstance(x, tuple):
            items = [to_cpu(v) for v in x]
            return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
        return x

    return copy.deepcopy(to_cpu(state))
