"""The evaluation module: seed streams, runs, tuning, aggregates and comparisons."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from learned_opt.evaluate import (
    COMPARISON_STREAMS,
    HAND_DESIGNED,
    SEALED_STREAMS,
    RunResult,
    SeedStreams,
    evaluation_family,
    geometric_mean,
    mean_loss,
    run_optimizer,
    seeds_won,
    smooth,
    speedup,
    task_seed,
    tune_lr,
    tune_lr_near,
    versus,
)
from learned_opt.tasks import QuadraticFamily


def test_seed_streams_are_named_disjoint_and_stable() -> None:
    tune, evals = COMPARISON_STREAMS.seeds(3, 5, seed=2)
    assert tune == [task_seed(2, 1_000_003, k) for k in range(3)]
    assert evals == [task_seed(2, 2_000_003, k) for k in range(5)]
    assert SEALED_STREAMS.eval_seeds(2) == [task_seed(0, 4_000_037, k) for k in range(2)]
    with pytest.raises(ValueError, match="overlap"):
        SeedStreams(tune=5, eval=5).seeds(1, 1)


def test_aggregates() -> None:
    assert mean_loss([1.0, 3.0]) == 2.0 and mean_loss([1.0, math.nan]) == math.inf
    assert math.isnan(mean_loss([]))
    assert geometric_mean([0.5, 2.0]) == pytest.approx(1.0)
    assert geometric_mean([1.0, math.inf]) == math.inf and geometric_mean([1.0, 0.0]) == math.inf
    assert math.isnan(geometric_mean([]))


def test_speedup_statuses_and_smoothing() -> None:
    adam = np.array([4.0, 3.0, 2.0, 1.5, 1.0])
    s = speedup(adam, np.array([4.0, 2.0, 1.0, 1.0, 1.0]))
    assert s["status"] == "ok" and s["value"] == pytest.approx(4 / 2)
    s = speedup(adam, np.array([4.0, 3.9, 3.8, 3.7, 3.6]))
    assert s["status"] == "censored" and s["value"] == pytest.approx(4 / 5)
    assert speedup(adam, np.array([4.0, np.nan, np.nan, np.nan, np.nan]))["status"] == "censored"
    s = speedup(np.array([1.0, 2.0, 2.0]), np.array([1.0, 1.0, 1.0]))
    assert s["status"] == "undefined" and math.isnan(s["value"])
    assert smooth([1.0, 3.0, 5.0, 7.0], 2).tolist() == [1.0, 2.0, 4.0, 6.0]


class _Modes(torch.optim.SGD):
    """An optimizer with training and evaluation modes (like schedule-free): in evaluation mode
    its parameters sit elsewhere."""

    def train(self) -> None:
        self.mode = "train"

    def eval(self) -> None:
        self.mode = "eval"
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.zero_()


def test_run_optimizer_uses_training_and_evaluation_modes() -> None:
    family = QuadraticFamily(dim=3)
    plain = run_optimizer(family, 7, lambda p, lr: torch.optim.SGD(p, lr=lr), 0.01, 4)
    moded = run_optimizer(family, 7, lambda p, lr: _Modes(p, lr=lr), 0.01, 4, name="modes")
    assert moded.losses == plain.losses  # the steps ran in training mode
    task = family.sample(torch.Generator().manual_seed(7))
    zeros = {k: torch.zeros_like(v) for k, v in task.init_params(torch.Generator()).items()}
    assert moded.final_train_loss == pytest.approx(float(task.loss(zeros, task.train.full())))
    assert moded.optimizer == "modes" and plain.optimizer == "SGD"


def test_tuning_picks_the_best_learning_rate_and_widens_near_a_center() -> None:
    family = QuadraticFamily(dim=3)
    seeds = [1, 2]
    grid = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    tuning = tune_lr(family, HAND_DESIGNED["adam"], seeds, 10, grid, name="adam")
    assert tuning.scores[tuning.lr] == min(tuning.scores.values())
    assert [r.seed for r in tuning.runs] == seeds and all(r.lr == tuning.lr for r in tuning.runs)
    assert tuning.at_edge == (tuning.lr in (1e-4, 1.0))
    near = tune_lr_near(family, HAND_DESIGNED["adam"], seeds, 10, grid, center=1e-4)
    assert near.lr == tuning.lr  # widened from [1e-4, 1e-3] until the best is inside
    assert set(near.scores) <= set(grid) and near.scores == {
        lr: tuning.scores[lr] for lr in near.scores
    }


def test_versus_and_seeds_won() -> None:
    def run(seed: int, final: float, losses: list[float]) -> RunResult:
        return RunResult("x", 1.0, seed, losses, final, 2 * final, 1.0)

    adam = [run(1, 1.0, [4.0, 3.0, 2.0, 1.0]), run(2, 2.0, [4.0, 3.0, 2.0, 1.0])]
    mine = [run(1, 0.5, [4.0, 1.0, 1.0, 1.0]), run(2, 2.5, [4.0, 1.0, 1.0, 1.0])]
    row = versus(mine, adam)
    assert row["ratio_train"] == pytest.approx(1.5 / 1.5) and row["ratio_test"] == 1.0
    assert row["won"] == 1 == seeds_won(mine, adam)
    assert row["speedup"]["status"] == "ok" and row["initial_loss"] == 4.0
    assert versus(adam, adam)["ratio_train"] == 1.0


def test_a_diverged_reference_leaves_ratios_undefined_not_zero() -> None:
    """Tuned Adam diverging on a seed makes its mean ``inf``: the ratios are undefined (NaN,
    and a geometric mean over them the worst, ``inf``), not 0; a finite loss beats the
    diverged seed."""

    def run(seed: int, final: float) -> RunResult:
        return RunResult("x", 1.0, seed, [4.0, 3.0, final], final, final, 1.0)

    adam = [run(1, 1.0), run(2, math.nan)]
    mine = [run(1, 2.0), run(2, 2.0)]
    row = versus(mine, adam)
    assert math.isnan(row["ratio_train"]) and math.isnan(row["ratio_test"])
    assert row["won"] == 1
    assert geometric_mean([0.9, row["ratio_train"]]) == math.inf


def test_speedup_after_a_later_blow_up_is_censored_and_spikes_do_not_erase_smoothing() -> None:
    adam = np.array([4.0, 3.0, 2.0, 1.5, 1.0])
    blown = np.array([4.0, 1.0, 1.0, np.inf, np.nan])
    assert speedup(adam, blown)["status"] == "censored"
    spiked = smooth([2.0] * 5 + [1e17] + [1.5] * 10, 3)
    assert spiked[-1] == 1.5 and spiked[0] == 2.0


def test_tuning_widens_past_an_edge_of_the_grid() -> None:
    family = QuadraticFamily(dim=3)
    narrow = tune_lr(family, HAND_DESIGNED["adam"], [1, 2], 10, [1e-4, 3e-4], widen=3)
    assert narrow.grid[0] == 1e-4 and narrow.grid[-1] > 3e-4 and len(narrow.grid) == 5
    assert narrow.lr == min(narrow.scores, key=narrow.scores.get)


@pytest.mark.parametrize(("final", "chosen"), [
    ({0.1: 1e-3, 0.3: 6e-7, 1.0: 8e-7, 3.0: 7e-8, 10.0: 0.0}, 0.3),  # float32's floor: ties
    ({0.1: 1e-3, 0.3: 2e-4, 1.0: 1e-4, 3.0: 3e-4, 10.0: 0.5}, 1.0),  # above it: the lowest
    ({0.1: -1.0, 0.3: -2.0, 1.0: -3.0, 3.0: -3e-7, 10.0: 0.0}, 1.0),  # negative: no floor
])  # fmt: skip
def test_tuning_ties_losses_at_float32_resolution(
    monkeypatch: pytest.MonkeyPatch, final: dict[float, float], chosen: float
) -> None:
    # A rate that drives the tuning seeds' loss to exactly zero (an unstable one, on tasks
    # solved to float32's resolution) does not beat rates that reach 1e-6 of the initial loss.
    import learned_opt.evaluate as evaluate

    def fake(family, seed, factory, lr, steps, name=""):  # noqa: ANN001, ANN202
        return RunResult(name, lr, seed, [1.0] * steps, final[lr], final[lr], 0.0)

    monkeypatch.setattr(evaluate, "run_optimizer", fake)
    tuning = tune_lr(QuadraticFamily(dim=3), HAND_DESIGNED["adam"], [1, 2], 3, list(final))
    assert tuning.lr == chosen
    assert tuning.scores == final  # the scores as measured
    # a scheduled variant's tuning near a rate chooses alike (its runs those of its choice)
    near = tune_lr_near(QuadraticFamily(dim=3), HAND_DESIGNED["adam"], [1, 2], 3, list(final), 1.0)
    assert near.lr == chosen and {r.lr for r in near.runs} == {chosen}


def test_evaluation_family_reports_the_official_test_split_of_mlp_families() -> None:
    """Final figures come from data meta-training and selection did not see: the official
    held-out split of every family that has one, the meta-test split of few-shot families."""
    assert evaluation_family("digits").holdout == "test"
    assert evaluation_family("digits", holdout="val").holdout == "val"
    assert evaluation_family("diverse").holdout == evaluation_family("val-ood").holdout == "test"
    assert evaluation_family("digits-fewshot").split == "test"
    assert evaluation_family("sinusoid").split == "test"
    with pytest.raises(ValueError, match="Unknown task family 'nope'"):
        evaluation_family("nope")
    assert evaluation_family("quadratic").config() == QuadraticFamily(dim=10).config()


def test_report_tables_never_rate_against_a_diverged_run_and_mark_an_edge() -> None:
    from learned_opt.report import table

    def records(name: str, finals: list[float], **extra) -> list[dict]:  # noqa: ANN003
        return [
            RunResult(name, 0.01, seed, [1.0], v, v, 0.0).record() | extra
            for seed, v in enumerate(finals)
        ]

    learned = records("learned", [0.35, 0.36, 0.34])
    diverged = records("adam", [0.30, 0.31, math.inf], lr_at_edge=True)
    lines = table(diverged + learned, "adam").splitlines()
    assert lines[2].startswith("| adam | 0.01 (edge) |") and "| inf |" in lines[2]
    assert lines[3].endswith("| n/a |")  # not 0.000: better on no seed
    lines = table(records("adam", [0.30, 0.31, 0.32]) + learned, "adam")
    assert lines.splitlines()[3].endswith("| 1.129 |")
    lines = table(records("adam", [0.3]) + records("learned", [math.nan]), "adam").splitlines()
    assert lines[3].endswith("| diverged |")


def test_a_plotted_curve_ends_where_a_seed_diverged(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three of four seeds diverge at step 3: the curve is the mean over all four and ends
    there, as the tables (which say "diverged") and ``mean_curve`` have it, instead of going on
    with the one seed left to a loss below the optimizer that did not diverge."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from learned_opt.report import plot_curves

    records = [
        {"optimizer": "adam", "lr": 1e-3, "losses": [1.0 - 0.05 * i for i in range(10)]}
        for _ in range(4)
    ]
    for seed in range(4):
        fine = [1.0 - 0.09 * i for i in range(10)]
        losses = fine if seed == 3 else fine[:3] + [math.nan] * 6 + [math.inf]
        records.append({"optimizer": "sgd", "lr": 1.0, "losses": losses})
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig))[1])
    plot_curves(records, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    lines = {line.get_label(): line.get_ydata() for line in figures[0].axes[0].get_lines()}
    sgd = lines["sgd (lr=1, n=4; a seed diverged at step 3)"]
    assert np.allclose(sgd[:3], [1.0, 0.91, 0.82]) and np.isnan(sgd[3:]).all()
    assert np.isfinite(lines["adam (lr=0.001, n=4)"]).all()
