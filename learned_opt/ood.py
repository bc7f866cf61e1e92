"""The out-of-distribution benchmark's tasks, and the learned weights compared on them.

The tasks are outside the ``"diverse"`` meta-training distribution
(:class:`~learned_opt.tasks.DiverseFamily`): other widths, depths, batch sizes, architectures
(conv nets on 8x8 digits, GRUs) and datasets (wine, breast cancer). ``benchmarks/ood.py`` runs
them against tuned Adam (:mod:`learned_opt.evaluate`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from . import pretrained
from .checkpoint import load_rule
from .rules import UpdateRule
from .tasks import ConvFamily, RandomMLPFamily, RowRNNFamily, TaskFamily

__all__ = ["OOD_TASKS", "load_learned", "parse_weights"]

#: Out-of-distribution tasks: name -> family factory (given the holdout).
OOD_TASKS: dict[str, Callable[[str], TaskFamily]] = {
    # wider and deeper than any MNIST MLP of "diverse" (<= 2 x 64), larger batches
    "mnist-mlp-relu-3x128-bs256": lambda h: RandomMLPFamily(
        "mnist", (128,), (3,), ("relu",), (256,), holdout=h
    ),
    # conv nets on 8x8 images ("diverse" has conv nets on MNIST only)
    "digits-conv-16x2": lambda h: ConvFamily("digits", (16,), (2,), (32,), holdout=h),
    # a GRU ("diverse" has Elman RNNs on MNIST only)
    "digits-gru-32": lambda h: RowRNNFamily("digits", ("gru",), (32,), (32,), holdout=h),
    # datasets never seen in meta-training
    "wine-mlp-tanh-32": lambda h: RandomMLPFamily("wine", (32,), (1,), ("tanh",), (32,), holdout=h),
    "breast-cancer-mlp-relu-2x64": lambda h: RandomMLPFamily(
        "breast_cancer", (64,), (2,), ("relu",), (64,), holdout=h
    ),
}


def load_learned(weights: str) -> UpdateRule:
    """Any rule (LSTMRule, GeneralLSTMRule, ...) from a shipped name or a weights file."""
    rule, _ = load_rule(pretrained.resolve(weights))
    return rule


def parse_weights(text: str) -> dict[str, str]:
    """``"a.pt,name=b.pt"`` -> ``{"a": "a.pt", "name": "b.pt"}`` (labels default to the stem)."""
    out: dict[str, str] = {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        label, _, path = item.rpartition("=")
        label = label or Path(path).stem
        if label in out:
            raise ValueError(f"Duplicate weights label {label!r}")
        out[label] = path
    if not out:
        raise ValueError("No weights given")
    return out
