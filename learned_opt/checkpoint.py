"""Saving and loading rules and trainer state, safely.

Every file is written atomically (:func:`~learned_opt.files.atomic_save`: a temporary file in the
same directory, ``fsync``, ``os.replace``) and read with ``torch.load(weights_only=True)``, which
refuses pickled code: a file carrying a pickle payload raises :class:`CheckpointError` and nothing
in it runs.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from .files import atomic_save, plain_data
from .rules import RULES, UpdateRule, build_rule

__all__ = [
    "RULE_FORMAT",
    "CheckpointError",
    "WeightsMismatchError",
    "atomic_save",
    "safe_load",
    "check_saveable",
    "rule_to_dict",
    "rule_from_dict",
    "save_rule",
    "load_rule",
]

#: Format tag of a rule record (inside weights files and trainer checkpoints).
RULE_FORMAT = "learned_opt.rule/1"


class CheckpointError(RuntimeError):
    """A checkpoint or weights file is missing, truncated, corrupt, unsafe or malformed."""


class WeightsMismatchError(CheckpointError, ValueError):
    """A weights file holds a rule of another architecture than the one expected."""


def safe_load(path: str | os.PathLike, *, map_location: Any = "cpu") -> Any:
    """Load a file written by :func:`atomic_save` without executing any code in it.

    Raises:
        CheckpointError: the file is missing, truncated, corrupt, or holds anything but tensors
            and plain containers (for example a pickled object whose unpickling would run code).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No such checkpoint file: {path}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        raise CheckpointError(
            f"Cannot read {path}: not a torch.save archive; the file is truncated or corrupt, or "
            "a raw pickle (which is never loaded, since unpickling can execute code)"
        )
    try:  # torch.load does not check the archive's CRCs: bytes changed inside a tensor load
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(
            f"Cannot read {path}: the file is truncated or corrupt ({exc})"
        ) from exc
    if damaged is not None:
        raise CheckpointError(f"Cannot read {path}: {damaged} in it is corrupt (CRC mismatch)")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"Refused to load {path}: it contains Python objects other than tensors and plain "
            f"containers, and loading them could execute code. Only files written by learned_opt "
            f"(torch.save of tensors, dicts, lists, numbers and strings) are accepted. ({exc})"
        ) from exc
    except Exception as exc:  # zipfile / EOF / RuntimeError from a truncated or garbled file
        raise CheckpointError(
            f"Cannot read {path}: the file is truncated or corrupt ({type(exc).__name__}: {exc})"
        ) from exc


def _class_name(cls: type) -> str:
    """``module:qualname`` (a record's ``"class"``: the qualified name is what is compared, so
    a class moved from a script to a module still matches)."""
    return f"{cls.__module__}:{cls.__qualname__}"


def check_saveable(rule: UpdateRule) -> None:
    """Whether ``rule``'s weights load back as its own class, by its ``kind`` in
    :data:`~learned_opt.rules.RULES`: a ``ValueError`` if they cannot load at all (no kind), a
    ``UserWarning`` if they would load back as another class (a subclass that keeps its
    parent's kind). A class that sets its kind but is not entered yet (one a by-value pickler
    such as cloudpickle rebuilt in another process) is entered now; one defined again under
    the same name (a module reloaded) is taken as the same class."""
    cls = type(rule)
    registered = RULES.get(rule.kind)
    if registered is cls:
        return
    if not rule.kind:
        raise ValueError(
            f"{cls.__qualname__} has no kind: set the class attribute kind to a name of its own "
            "(e.g. kind = 'my-rule'), under which its weights are saved and found again"
        )
    if registered is None and cls.__dict__.get("kind") == rule.kind:
        RULES[rule.kind] = cls
        return
    if registered is None:
        raise ValueError(f"{cls.__qualname__}'s kind {rule.kind!r} names no known rule class")
    if _class_name(registered) == _class_name(cls):
        return
    warnings.warn(
        f"{cls.__qualname__} keeps the kind {rule.kind!r} of {registered.__qualname__}: its "
        f"weights load back as {registered.__qualname__}. Give it a kind of its own (the class "
        "attribute kind = 'my-rule')",
        UserWarning,
        stacklevel=3,
    )


def rule_to_dict(rule: UpdateRule, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """A plain-dict record of a rule: kind, config, weights (on CPU) and metadata, readable
    with ``torch.load(weights_only=True)`` (numpy numbers and paths in the config or metadata
    become plain values).

    Raises:
        ValueError: the rule could not load back (:func:`check_saveable`; a ``UserWarning`` if
            it would load back as another class).
        TypeError: its config or the metadata hold a value a safe load refuses.
    """
    check_saveable(rule)
    return {
        "format": RULE_FORMAT,
        "kind": rule.kind,
        "class": _class_name(type(rule)),
        "config": plain_data(rule.config(), f"the {rule.kind!r} rule's config"),
        "state_dict": {k: v.detach().cpu().clone() for k, v in rule.state_dict().items()},
        "metadata": plain_data(dict(metadata or {}), "the metadata"),
    }


def _shape(t: Any) -> tuple[int, ...] | str:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def rule_from_dict(
    record: Any, *, expected_kind: str | None = None, source: str = "<record>"
) -> UpdateRule:
    """Rebuild a rule from :func:`rule_to_dict`'s record, checking every tensor's shape.

    Raises:
        WeightsMismatchError: wrong kind, or tensors that do not fit the recorded architecture;
            the message names what was expected and what was found.
        CheckpointError: not a rule record at all.
    """
    if not isinstance(record, dict) or record.get("format") != RULE_FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise CheckpointError(
            f"{source} is not a learned_opt rule file: expected format {RULE_FORMAT!r}, "
            f"found {found!r}"
        )
    kind = record.get("kind")
    if kind not in RULES:
        raise WeightsMismatchError(
            f"{source} holds a rule of unknown kind {kind!r}; known: {sorted(RULES)}. A rule "
            "class of your own is known once it is defined (imported) with kind = "
            f"{kind!r}: define it before loading its weights"
        )
    if expected_kind is not None and kind != expected_kind:
        raise WeightsMismatchError(
            f"{source}: expected weights of a {expected_kind!r} rule, found a {kind!r} rule"
        )
    config = record.get("config") or {}
    if not isinstance(config, dict) or not isinstance(record.get("metadata") or {}, dict):
        raise CheckpointError(f"{source}: the rule record's config and metadata must be dicts")
    try:  # on the meta device first: a config with huge sizes allocates nothing before the check
        with torch.device("meta"):
            expected = build_rule(kind, config).state_dict()
    except (TypeError, ValueError, RuntimeError) as exc:  # not a config of this kind of rule
        raise WeightsMismatchError(
            f"{source}: not a valid configuration of a {kind!r} rule: {config} ({exc})"
        ) from exc
    found = record.get("state_dict")
    if not isinstance(found, dict):
        raise CheckpointError(f"{source}: the rule record has no state_dict")
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [
        f"{k}: expected {tuple(expected[k].shape)}, found {_shape(found[k])}"
        for k in sorted(set(expected) & set(found))
        if not isinstance(found[k], torch.Tensor) or found[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        details = "; ".join(
            part
            for part in (
                f"missing tensors {missing}" if missing else "",
                f"unexpected tensors {unexpected}" if unexpected else "",
                "wrong shapes: " + ", ".join(wrong) if wrong else "",
            )
            if part
        )
        raise WeightsMismatchError(
            f"{source}: the weights do not fit a {kind!r} rule with config {config}: {details}"
        )
    rule = build_rule(kind, config)
    saved_class = record.get("class")
    if isinstance(saved_class, str) and saved_class.split(":")[-1] != type(rule).__qualname__:
        warnings.warn(
            f"{source} was saved from {saved_class}; it loads as {_class_name(type(rule))}, "
            f"the class of the kind {kind!r}",
            UserWarning,
            stacklevel=3,
        )
    rule.load_state_dict({k: v.to(expected[k].dtype) for k, v in found.items()})
    nonfinite = sorted(rule.nonfinite_weights())
    if nonfinite:  # a rule's in-place step relies on finite weights for finite updates
        raise CheckpointError(f"{source}: non-finite values in the weights {nonfinite}")
    return rule


def save_rule(
    path: str | os.PathLike, rule: UpdateRule, metadata: dict[str, Any] | None = None
) -> None:
    """Write a rule (and metadata such as how it was produced) to a weights file, atomically."""
    atomic_save(rule_to_dict(rule, metadata), path)


def load_rule(
    path: str | os.PathLike, *, expected_kind: str | None = None, which: str = "best"
) -> tuple[UpdateRule, dict[str, Any]]:
    """Load a rule from a weights file or from a meta-trainer checkpoint.

    A trainer checkpoint carries two rules, the latest and the best by held-out evaluation;
    ``which`` (``"best"`` or ``"latest"``) says which one is returned (a weights file holds one).

    Returns:
        ``(rule, metadata)``.
    """
    if which not in ("best", "latest"):
        raise ValueError(f"Invalid which={which!r}; expected 'best' or 'latest'")
    obj = safe_load(path)
    if isinstance(obj, dict) and "best_rule" in obj:  # a meta-trainer checkpoint
        key = "best_rule" if which == "best" else "rule"
        if key not in obj:
            raise CheckpointError(f"{path}: a trainer checkpoint without its {key!r} record")
        obj = obj[key]
    rule = rule_from_dict(obj, expected_kind=expected_kind, source=str(path))
    return rule, dict(obj.get("metadata") or {})
