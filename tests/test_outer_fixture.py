"""Meta-training is reproducible across refactors: a few iterations of several configurations give
the meta-parameters (and held-out figures) recorded in ``tests/fixtures``, up to rounding: bit for
bit on the machine that recorded them, within 1e-3 of each tensor's largest entry (at least a
tenth of the largest of all) on another CPU (PyTorch's matrix products and sums round differently
by instruction set, and evolution strategies amplify the difference: 2e-4 measured between two
x86-64 machines), far below what a change of the computation moves.

Regenerate the fixture only for a deliberate change of the numbers:
``python tests/test_outer_fixture.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from learned_opt import MetaTrainConfig, MetaTrainer, kernels

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "meta_train_runs.pt"

_TINY = dict(family="quadratic", rule_kwargs={"hidden_size": 4, "num_layers": 1}, seed=11)

#: name -> configuration: the estimators, gradient checkpointing, the loss-averse objective,
#: drawn horizons, the cosine schedule and the held-out evaluation with the tuned-Adam baseline.
CONFIGS: dict[str, dict[str, Any]] = {
    "tbptt": dict(horizon=8, truncation=4, iterations=3, eval_every=2, eval_tasks=2, **_TINY),
    "tbptt-checkpointed-loss-averse": dict(
        horizon=9,
        min_horizon=3,
        truncation=3,
        objective="test",
        log_meta_loss=True,
        loss_aversion=2.0,
        grad_checkpoint=True,
        meta_batch=2,
        meta_lr_schedule="cosine",
        iterations=3,
        eval_every=3,
        eval_tasks=2,
        eval_horizon=5,
        **_TINY,
    ),
    "pes": dict(
        horizon=6,
        truncation=3,
        estimator="pes",
        estimator_kwargs={"sigma": 0.01, "pairs": 2},
        iterations=3,
        eval_every=0,
        **_TINY,
    ),
    "es": dict(
        horizon=6,
        truncation=3,
        estimator="es",
        estimator_kwargs={"pairs": 1},
        meta_batch=2,
        iterations=2,
        eval_every=0,
        **_TINY,
    ),
}


def pure_pytorch() -> None:
    """Use the pure-PyTorch LSTM cell (the fused kernel's rounding may differ by compiler)."""
    kernels._TRIED, kernels._EXT = True, None


def run(config: dict[str, Any]) -> dict[str, Any]:
    trainer = MetaTrainer(MetaTrainConfig(**config))
    trainer.train()
    adam = trainer.adam_baseline or {}
    return {
        "learner": {k: v.detach().clone() for k, v in trainer.learner.state_dict().items()},
        "eval_metric": list(trainer.history["eval_metric"]),
        "adam_metric": adam.get("metric"),
        "adam_lr": adam.get("lr"),
    }


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_meta_training_reproduces_the_recorded_run(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernels, "_TRIED", True)
    monkeypatch.setattr(kernels, "_EXT", None)
    expected = torch.load(FIXTURE, weights_only=True)[name]
    got = run(CONFIGS[name])
    assert expected["learner"].keys() == got["learner"].keys()
    largest = max(float(v.abs().max()) for v in expected["learner"].values())
    for key, value in expected["learner"].items():
        # A one-number tensor moved little (the read-out's bias, ~3e-3) is held to a tenth of
        # the largest entry's scale: its own would leave ES's amplified rounding no room.
        scale = max(float(value.abs().max()), 0.1 * largest, 1e-6)
        torch.testing.assert_close(got["learner"][key], value, rtol=0, atol=1e-3 * scale)
    assert got["eval_metric"] == pytest.approx(expected["eval_metric"], rel=1e-5)
    assert got["adam_metric"] == (
        None
        if expected["adam_metric"] is None
        else pytest.approx(expected["adam_metric"], rel=1e-5)
    )
    assert got["adam_lr"] == expected["adam_lr"]


if __name__ == "__main__":
    pure_pytorch()
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    torch.save({name: run(cfg) for name, cfg in CONFIGS.items()}, FIXTURE)
    print(f"wrote {FIXTURE}", file=sys.stderr)
