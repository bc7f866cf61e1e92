"""Tasks, task families and the named families of the command line."""

from __future__ import annotations

from typing import Any

from .base import Batch, BatchSampler, FlatSpec, Task, TaskFamily, uniform_init
from .fewshot import DigitsFewShotFamily, MNISTFewShotFamily, SinusoidFamily
from .groups import GROUPS, MetaTrainFamily, ValidationFamily
from .label_noise import LabelNoiseFamily
from .mixture import DiverseFamily, MixtureFamily, ValidationOODFamily, sample_horizon
from .mlp import ACTIVATIONS, MLPFamily, make_mlp
from .quadratic import QuadraticFamily
from .rescale import RescaledFamily
from .zoo import ConvFamily, RandomMLPFamily, RowRNNFamily

__all__ = [
    "ACTIVATIONS",
    "FAMILIES",
    "Batch",
    "BatchSampler",
    "ConvFamily",
    "DigitsFewShotFamily",
    "DiverseFamily",
    "FlatSpec",
    "GROUPS",
    "LabelNoiseFamily",
    "MLPFamily",
    "MNISTFewShotFamily",
    "MetaTrainFamily",
    "MixtureFamily",
    "QuadraticFamily",
    "RandomMLPFamily",
    "RescaledFamily",
    "RowRNNFamily",
    "SinusoidFamily",
    "Task",
    "TaskFamily",
    "ValidationFamily",
    "ValidationOODFamily",
    "make_family",
    "make_mlp",
    "sample_horizon",
    "uniform_init",
]

#: Named task families: name -> (constructor, default keyword arguments).
FAMILIES: dict[str, tuple[type[TaskFamily], dict[str, Any]]] = {
    "quadratic": (QuadraticFamily, {"dim": 10}),
    # The paper's MNIST task: 784-20-10 sigmoid MLP, batch 128.
    "mnist": (MLPFamily, {"dataset": "mnist", "hidden": (20,), "activation": "sigmoid"}),
    "mnist-40": (MLPFamily, {"dataset": "mnist", "hidden": (40,), "activation": "sigmoid"}),
    "mnist-2layer": (MLPFamily, {"dataset": "mnist", "hidden": (20, 20), "activation": "sigmoid"}),
    "mnist-relu": (MLPFamily, {"dataset": "mnist", "hidden": (20,), "activation": "relu"}),
    "digits": (
        MLPFamily,
        {"dataset": "digits", "hidden": (20,), "activation": "sigmoid", "batch_size": 32},
    ),
    # Few-shot families (support set = Task.train, query set = Task.test).
    "sinusoid": (SinusoidFamily, {"k_shot": 10, "n_query": 50}),
    "digits-fewshot": (DigitsFewShotFamily, {"n_way": 5, "k_shot": 1, "n_query": 15}),
    "mnist-fewshot": (MNISTFewShotFamily, {"n_way": 5, "k_shot": 1, "n_query": 15}),
    # The default weights' meta-training distribution (MLPs, conv nets, RNNs, regression; see
    # mixture.py), and the same with random per-task parameter and loss scales (tasks/rescale.py).
    "diverse": (DiverseFamily, {}),
    "diverse-rescaled": (
        DiverseFamily,
        {"param_scale_range": (0.2, 5.0), "loss_scale_range": (1e-2, 1e2)},
    ),
    # Validation tasks outside both "diverse" and benchmarks/ood.py, for weight selection
    # (MetaTrainConfig.eval_family).
    "val-ood": (ValidationOODFamily, {}),
    # Disjoint task groups (tasks/groups.py): meta-training (adds batch-norm conv nets, LSTMs and
    # attention models with LayerNorm to "diverse"), with random per-task scales, and
    # validation. The third group, the sealed test, is deliberately not registered here.
    "meta-train": (MetaTrainFamily, {}),
    "meta-train-rescaled": (
        MetaTrainFamily,
        {"param_scale_range": (0.2, 5.0), "loss_scale_range": (1e-2, 1e2)},
    ),
    # The same with a fifth of each classification task's training labels replaced (a noise
    # floor, as the validation and sealed test groups have: tasks/label_noise.py).
    "meta-train-noisy": (MetaTrainFamily, {"label_noise": 0.2}),
    "validation": (ValidationFamily, {}),
}


def make_family(name: str, **overrides: Any) -> TaskFamily:
    """Build a named task family, with keyword overrides of its defaults.

    Raises:
        ValueError: unknown family name.
    """
    if name not in FAMILIES:
        raise ValueError(f"Unknown task family {name!r}; expected one of {sorted(FAMILIES)}")
    cls, defaults = FAMILIES[name]
    return cls(**{**defaults, **overrides})
