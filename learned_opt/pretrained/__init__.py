"""Meta-trained weights shipped inside the package (no network access needed).

Each ``<name>.pt`` is a rule file written by :func:`learned_opt.checkpoint.save_rule`; its
metadata (also in ``<name>.json``) records the command, the commit, the meta-training budget and
the figures the weights reached.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT", "available", "path", "metadata", "resolve"]

_DIR = Path(__file__).resolve().parent

#: The weights that ``LSTMOptimizer`` uses when none are given: the LSTM-corrected Adam rule,
#: meta-trained on a diverse task distribution (``"general"``), with its step-size adaptation
#: (``"general-v2"``), then the momenta of its Adam direction (``"general-v3"``), then the
#: adaptation's shrinking retuned on the validation tasks (``"general-v4"``), then a
#: hand-designed warm-up and decay applied only when the run's length is given
#: (``total_steps``; without it, ``"general-v4"`` step for step: ``"general-v5"``), then Muon's
#: direction for matrices (``"general-v6"``), then the step-size adaptation learned from
#: nothing instead of hand-designed (``"general-v7"``); better than each on the sealed test
#: tasks. The former defaults and the paper's MNIST LSTM stay available by name.
DEFAULT = "general-v7"


def available() -> list[str]:
    """Names of the shipped weights."""
    return sorted(p.stem for p in _DIR.glob("*.pt"))


def path(name: str) -> Path:
    """File of the shipped weights ``name``.

    Raises:
        ValueError: no weights of that name are shipped.
    """
    file = _DIR / f"{name}.pt"
    if not file.is_file():
        raise ValueError(f"No shipped weights named {name!r}; available: {available()}")
    return file


def resolve(weights: str | os.PathLike) -> Path:
    """The file behind ``weights``: the name of shipped weights, or a path to an existing file.

    Raises:
        ValueError: neither a shipped name nor an existing file.
    """
    if isinstance(weights, str) and weights in available():
        return path(weights)
    if os.path.isfile(weights):
        return Path(weights)
    raise ValueError(
        f"weights={weights!r} is neither a shipped name ({available()}) nor an existing file"
    )


def metadata(name: str) -> dict[str, Any]:
    """The metadata recorded with the shipped weights ``name``."""
    meta = _DIR / f"{name}.json"
    if meta.is_file():
        return json.loads(meta.read_text())
    path(name)  # raises if the weights themselves are missing
    return {}
