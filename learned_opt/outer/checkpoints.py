"""The meta-trainer's state as plain data, and its checkpoint files.

A checkpoint holds everything a resumed run needs to repeat exactly what an uninterrupted run
would have done (the learner, the meta-optimizer, the evaluation history, the best weights, the
loss-averse objective's reference, the held-out family's configuration: resumed on other
held-out tasks, the best weights are evaluated again on them), and the rules as weights
records, so that ``load_rule`` and ``learned-opt export`` read a checkpoint like a weights file.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import socket
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import distributed, rules
from ..checkpoint import CheckpointError, atomic_save, rule_to_dict, safe_load
from .config import MetaTrainConfig

if TYPE_CHECKING:
    from ..learners import MetaLearner
    from .trainer import MetaTrainer

__all__ = [
    "LOCK_NAME",
    "RESUMABLE_CHANGES",
    "TRAINER_FORMAT",
    "check_state",
    "find_checkpoints",
    "hold_directory",
    "learner_record",
    "read_checkpoint",
    "release_directory",
    "restore_trainer",
    "trainer_state",
    "write_checkpoint",
]

TRAINER_FORMAT = "learned_opt.trainer/1"

#: Settings that change neither the math nor the randomness of a run (checkpointing recomputes
#: the same values): a run may be resumed with other values of these. (Only a run that rolls
#: back, after ``rollback_after`` non-finite meta-steps in a row, depends on
#: ``checkpoint_every``: its periodic checkpoints are where a rollback returns to.)
RESUMABLE_CHANGES = frozenset(
    {
        "iterations",
        "time_budget",
        "eval_every",
        "checkpoint_every",
        "keep_checkpoints",
        "grad_checkpoint",
        "grad_checkpoint_segment",
    }
)


#: The file a training run holds in its checkpoint directory (:func:`hold_directory`).
LOCK_NAME = ".run.lock"


def hold_directory(ckpt_dir: str | Path) -> Path:
    """Take ``ckpt_dir`` for the run of this process (its checkpoint writer): a lock file
    naming the process. A lock left by a run that died (no such process on this machine, or
    this very process) is taken over.

    Raises:
        FileExistsError: another run holds the directory: both would write and prune the same
            checkpoints and ``best.pt``, each destroying the other's.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    lock = ckpt_dir / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is not None and _alive(holder):
                raise FileExistsError(
                    f"{ckpt_dir} is being written by another run (process {holder['pid']} on "
                    f"{holder['host']}): two runs there would overwrite each other's "
                    f"checkpoints and best.pt. Use another checkpoint directory, or, if no "
                    f"such run is going on, delete {lock}"
                ) from None
            lock.unlink(missing_ok=True)  # left by a run that died
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return lock
    raise FileExistsError(f"could not take {lock}: other runs keep taking it")


def release_directory(lock: Path) -> None:
    """Remove the lock :func:`hold_directory` took, if it is still this process's."""
    if _lock_holder(lock) == {"pid": os.getpid(), "host": socket.gethostname()}:
        lock.unlink(missing_ok=True)


def _lock_holder(lock: Path) -> dict[str, Any] | None:
    """The process a lock file names, or ``None`` (gone, or unreadable: a write cut short)."""
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(holder, dict) and isinstance(holder.get("pid"), int)
    return {"pid": holder["pid"], "host": str(holder.get("host"))} if ok else None


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the process a lock names may still be running (on another machine: it cannot
    be told, so yes)."""
    if holder["host"] != socket.gethostname():
        return True
    if holder["pid"] == os.getpid():
        return False  # this process's own, from a run that ended without releasing it
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    return True


def find_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Trainer checkpoints in ``ckpt_dir``, newest first."""
    return sorted(Path(ckpt_dir).glob("ckpt_*.pt"), reverse=True)


def trainer_state(trainer: MetaTrainer) -> dict[str, Any]:
    """The whole trainer state as plain data (loadable with ``weights_only=True``). Before any
    held-out evaluation (or in a run without them) the best weights are the latest."""
    evaluated = bool(trainer.history["eval_iteration"])
    best_state = trainer.best_state if evaluated else trainer.learner.state_dict()
    best_iteration = trainer.best_iteration if evaluated else trainer.iteration
    state: dict[str, Any] = {
        "format": TRAINER_FORMAT,
        "config": trainer.config.to_dict(),
        "family": trainer.family.config(),
        "eval_family": trainer.eval_family.config(),
        "learner_settings": learner_record(trainer.learner),
        "iteration": trainer.iteration,
        "elapsed": trainer.elapsed,
        "learner": trainer.learner.state_dict(),
        "best_learner": best_state,
        "best_metric": trainer.best_metric,
        "best_iteration": best_iteration,
        "meta_optimizer": trainer.meta_opt.state_dict(),
        "history": trainer.history,
        "adam_baseline": trainer.adam_baseline,
        "skipped_steps": trainer.skipped_steps,
        "consecutive_skips": trainer.consecutive_skips,
        "rollbacks": trainer.rollbacks,
        "notes": trainer.notes,
        # Where a rollback returns to: the last periodic checkpoint's state (this one's, or
        # an earlier one's for a checkpoint written at the end or on an interruption).
        "rollback_learner": trainer._good[0],
        "rollback_meta_optimizer": trainer._good[1],
    }
    if trainer.reference is not None:
        state["reference_learner"] = trainer.reference.state_dict()
    rule = getattr(trainer.learner, "rule", None)
    if rule is not None:
        meta = {
            "source": "meta_train", "iteration": trainer.iteration, "config": state["config"],
            "family": state["family"],  # (the tasks trained on: a family of one's own too)
        }  # fmt: skip
        state["rule"] = rule_to_dict(rule, meta)
        best = rules.build_rule(rule.kind, rule.config())
        prefix = "rule."  # the learner's other meta-parameters (a learned initialization) aside
        best.load_state_dict(
            {k[len(prefix) :]: v for k, v in best_state.items() if k.startswith(prefix)}
        )
        selection = {"eval_metric": trainer.best_metric, "best_iteration": best_iteration}
        if not evaluated:
            selection["selected"] = "latest: no held-out evaluation"
        state["best_rule"] = rule_to_dict(best, {**meta, **selection})
    return state


#: What every trainer checkpoint holds.
_REQUIRED = (
    "config", "iteration", "elapsed", "learner", "best_learner", "best_metric",
    "meta_optimizer", "history", "adam_baseline",
)  # fmt: skip


def learner_record(learner: MetaLearner) -> dict[str, Any]:
    """What a checkpoint records of ``learner`` beyond its weights: its class and its
    :meth:`~learned_opt.learners.MetaLearner.settings`."""
    return {"class": type(learner).__name__, **learner.settings()}


def _as_json(record: Any) -> str:
    return json.dumps(record, sort_keys=True, default=str)  # (tuples compare as lists)


def _config_diff(trainer: MetaTrainer, state: dict[str, Any]) -> dict[str, Any]:
    """The settings of the saved run that differ from ``trainer``'s (those a resume may not
    change), as ``{name: (saved, current)}``: the configuration's, and, where the checkpoint
    records them, the training family's (``"family"``, which a family of one's own sets apart
    from the configuration's) and the learner's (``"learner_settings"``)."""
    try:
        theirs = MetaTrainConfig.from_dict(state["config"]).to_dict()
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"The checkpoint's configuration is not readable: {exc}") from None
    mine = trainer.config.to_dict()
    diff = {
        k: (theirs[k], mine[k]) for k in mine if k not in RESUMABLE_CHANGES and mine[k] != theirs[k]
    }
    current = {
        "family": trainer.family.config(),
        "learner_settings": learner_record(trainer.learner),
    }
    saved_learner = state.get("learner_settings")
    if isinstance(saved_learner, dict):  # a setting recorded since it was written: compared
        defaults = _defaults(type(trainer.learner))  # with the value runs had before it
        current["learner_settings"] = {
            k: v
            for k, v in current["learner_settings"].items()
            if k in saved_learner or k not in defaults or defaults[k] != v
        }
    for key, record in current.items():
        if state.get(key) is not None and _as_json(state[key]) != _as_json(record):
            diff[key] = (state[key], record)
    return diff


def _defaults(cls: type) -> dict[str, Any]:
    """The default values of ``cls``'s constructor arguments."""
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def check_state(trainer: MetaTrainer, state: Any) -> None:
    """A :class:`CheckpointError` unless ``state`` is a whole trainer checkpoint whose tensors
    fit ``trainer`` and are finite (one written for another configuration passes: restoring it
    raises a ``ValueError`` naming the difference). Changes nothing."""
    if not isinstance(state, dict) or state.get("format") != TRAINER_FORMAT:
        raise CheckpointError(f"Not a learned_opt trainer checkpoint (format {TRAINER_FORMAT})")
    if missing := [k for k in _REQUIRED if k not in state]:
        raise CheckpointError(f"The checkpoint lacks {missing}")
    if _config_diff(trainer, state):
        return
    expected = {k: tuple(v.shape) for k, v in trainer.learner.state_dict().items()}
    for key in ("learner", "best_learner", "rollback_learner"):
        if key not in state:  # (the rollback point: not in checkpoints written before it)
            continue
        saved = state[key]
        if not isinstance(saved, dict) or set(saved) != set(expected):
            raise CheckpointError(f"The checkpoint's {key!r} is not this learner's state")
        for name, value in saved.items():
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != expected[name]:
                raise CheckpointError(
                    f"The checkpoint's {key} {name!r} is not a tensor of shape {expected[name]}"
                )
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"The checkpoint's {key} {name!r} is not finite")
    for key in ("meta_optimizer", "rollback_meta_optimizer"):
        if key in state:
            _check_meta_optimizer(trainer, key, state[key])
    meta = state["meta_optimizer"]
    history = state["history"]
    if not (
        isinstance(history, dict)
        and all(isinstance(history.get(k), list) for k in ("eval_iteration", "eval_metric"))
        and len(history["eval_iteration"]) == len(history["eval_metric"])
    ):
        raise CheckpointError(
            "The checkpoint's 'history' is not a record of evaluations (eval_iteration and "
            "eval_metric, lists of one length)"
        )
    for key in ("iteration", "elapsed", "best_metric"):
        if not isinstance(state[key], int | float) or isinstance(state[key], bool):
            raise CheckpointError(f"The checkpoint's {key!r} is not a number")
    for entry in meta["state"].values():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"The checkpoint's meta-optimizer {name!r} is not finite")


def _check_meta_optimizer(trainer: MetaTrainer, key: str, meta: Any) -> None:
    """A :class:`CheckpointError` unless ``meta`` (the checkpoint's ``key``) is a state of the
    trainer's meta-optimizer: its param groups of as many tensors."""
    if not isinstance(meta, dict) or not {"state", "param_groups"} <= set(meta):
        raise CheckpointError(f"The checkpoint's {key!r} is not an optimizer's state")
    groups, mine = meta["param_groups"], trainer.meta_opt.param_groups
    if not (
        isinstance(groups, list)
        and len(groups) == len(mine)
        and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)
        and [len(g["params"]) for g in groups] == [len(g["params"]) for g in mine]
        and isinstance(meta["state"], dict)
    ):
        raise CheckpointError(
            f"The checkpoint's {key!r} does not fit this learner's meta-optimizer "
            f"({len(mine)} param groups of {[len(g['params']) for g in mine]} tensors)"
        )


def restore_trainer(trainer: MetaTrainer, state: dict[str, Any]) -> None:
    """Restore :func:`trainer_state` into ``trainer``, whose configuration must match the
    saved one except in :data:`RESUMABLE_CHANGES`.

    Raises:
        CheckpointError: a malformed checkpoint (:func:`check_state`), before any change.
        ValueError: a checkpoint of a run configured otherwise, before any change.
    """
    check_state(trainer, state)
    if diff := _config_diff(trainer, state):
        raise ValueError(f"Checkpoint configuration differs (saved, current): {diff}")
    trainer.learner.load_state_dict(state["learner"])
    if trainer.reference is not None:
        if "reference_learner" not in state:
            raise CheckpointError("The checkpoint has no reference learner (loss_aversion)")
        trainer.reference.load_state_dict(state["reference_learner"])
    trainer.meta_opt.load_state_dict(state["meta_optimizer"])
    trainer.iteration = int(state["iteration"])
    trainer.elapsed = float(state["elapsed"])
    trainer.best_state = state["best_learner"]
    trainer.best_metric = float(state["best_metric"])
    trainer.history = state["history"]
    trainer.best_iteration = int(state.get("best_iteration", -1))
    if trainer.best_iteration < 0:  # checkpoints written before best_iteration was recorded
        metrics = trainer.history.get("eval_metric", [])
        its = trainer.history.get("eval_iteration", [])
        trainer.best_iteration = its[int(np.argmin(metrics))] if metrics else 0
    trainer.adam_baseline = state["adam_baseline"]
    trainer.skipped_steps = int(state.get("skipped_steps", 0))
    trainer.consecutive_skips = int(state.get("consecutive_skips", 0))
    trainer.notes = state.get("notes") or {"commands": []}
    if isinstance(state.get("rollback_learner"), dict) and isinstance(
        state.get("rollback_meta_optimizer"), dict
    ):
        trainer._good = (
            copy.deepcopy(state["rollback_learner"]),
            copy.deepcopy(state["rollback_meta_optimizer"]),
        )
    else:  # checkpoints written before they held it: the loaded state
        trainer._good = trainer._snapshot()
    trainer.rollbacks = int(state.get("rollbacks", 0))
    if trainer.history["eval_iteration"] and not _same(state.get("eval_family"), trainer):
        _reselect_on_current_tasks(trainer, state.get("eval_family"))


def _same(saved_eval_family: Any, trainer: MetaTrainer) -> bool:
    """Whether the checkpoint's held-out family is the trainer's (by configuration)."""
    if saved_eval_family is None:  # written before checkpoints recorded it: unknown
        return False
    return _as_json(saved_eval_family) == _as_json(trainer.eval_family.config())


def _reselect_on_current_tasks(trainer: MetaTrainer, saved_eval_family: Any) -> None:
    """The held-out tasks changed since the checkpoint (a task group redefined, say): its best
    metric and tuned-Adam baseline were measured on other tasks, so a new evaluation would be
    compared with a figure it cannot be compared with. Evaluate the best weights on the current
    tasks, keep that as the best metric, and recompute the baseline at the next evaluation."""
    latest = copy.deepcopy(trainer.learner.state_dict())
    trainer.learner.load_state_dict(trainer.best_state)
    metric, _ = trainer.held_out.evaluate(trainer.learner)
    trainer.learner.load_state_dict(latest)
    current = trainer.eval_family.config()
    if saved_eval_family is None:
        was = "not recorded in the checkpoint"
    else:
        keys = sorted(set(saved_eval_family) | set(current), key=str)
        was = ", ".join(
            f"{k}: {saved_eval_family.get(k)!r} then, {current.get(k)!r} now"
            for k in keys
            if saved_eval_family.get(k) != current.get(k)
        )
    change = {
        "iteration": trainer.iteration,
        "held_out_family_change": was,
        "saved_best_metric": trainer.best_metric,
        "best_metric_on_current_tasks": metric,
    }
    trainer.notes.setdefault("held_out_changes", []).append(change)
    warnings.warn(
        f"The checkpoint's held-out tasks are not this run's ({was}): its best weights "
        f"(iteration {trainer.best_iteration}) were evaluated again on the current ones, "
        f"{metric:.4g} (was {trainer.best_metric:.4g}); the tuned-Adam baseline is recomputed.",
        RuntimeWarning,
        stacklevel=3,
    )
    trainer.best_metric = metric
    trainer.adam_baseline = None


def write_checkpoint(ckpt_dir: Path, state: dict[str, Any], keep: int) -> Path:
    """Write ``ckpt_<iteration>.pt`` atomically (and the rules as ``best.pt`` and ``last.pt``),
    keeping the newest ``keep`` checkpoints; removes the temporary files of writes that a killed
    process left (this run's are done)."""
    path = ckpt_dir / f"ckpt_{state['iteration']:08d}.pt"
    atomic_save(state, path)
    if "best_rule" in state:
        atomic_save(state["best_rule"], ckpt_dir / "best.pt")
        atomic_save(state["rule"], ckpt_dir / "last.pt")
    for old in find_checkpoints(ckpt_dir)[keep:]:
        old.unlink(missing_ok=True)
    for name in ("ckpt_*.pt", "best.pt", "last.pt"):  # (atomic_save's temporary names)
        for stale in ckpt_dir.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
    return path


def read_checkpoint(
    path: str | Path | None,
    ckpt_dir: Path | None,
    check: Callable[[Any], None] | None = None,
) -> dict[str, Any] | None:
    """The state in ``path``, or in the newest readable checkpoint of ``ckpt_dir``; ``None`` if
    there is none. A truncated, corrupt or, by ``check`` (raising :class:`CheckpointError`),
    malformed checkpoint newer than the one used is reported with a warning and renamed
    ``*.pt.unreadable`` (so that it takes none of the kept checkpoints' places).

    Raises:
        CheckpointError: ``path`` is unreadable, or none of ``ckpt_dir``'s checkpoints is (they
            are left as they are: all of them failing is more likely another run's directory
            or a learner built otherwise than damage to each).
    """
    if path is not None:
        state = safe_load(Path(path))
        if check is not None:
            check(state)
        return state
    candidates = find_checkpoints(ckpt_dir) if ckpt_dir is not None else []
    failed: list[tuple[Path, CheckpointError]] = []
    for candidate in candidates:
        try:
            state = safe_load(candidate)
            if check is not None:
                check(state)
        except CheckpointError as exc:
            failed.append((candidate, exc))
            continue
        for bad, exc in failed:
            aside = bad.with_name(bad.name + ".unreadable")
            if distributed.is_main():  # (gone already, or a read-only directory: left there)
                with contextlib.suppress(OSError):
                    bad.rename(aside)
            warnings.warn(
                f"Skipping unreadable checkpoint (kept as {aside.name}): {exc}",
                RuntimeWarning,
                stacklevel=3,
            )
        return state
    if failed:
        reasons = "; ".join(f"{bad.name}: {exc}" for bad, exc in failed[:3])
        raise CheckpointError(
            f"None of the {len(failed)} checkpoints in {ckpt_dir} can be resumed ({reasons}); "
            "nothing was changed. Resume with the learner that wrote them, or start afresh in "
            "another checkpoint directory"
        )
    return None
