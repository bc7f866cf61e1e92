"""Every benchmark has a --smoke mode, run here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_eval_vs_tuned_smoke(tmp_path: Path, run_script) -> None:
    assert run_script("benchmarks/eval_vs_tuned.py", "--smoke", "--out", str(tmp_path)) == 0
    assert "mean / adam" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "records.jsonl").stat().st_size > 0
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_mnist_paper_smoke(tmp_path: Path, run_script) -> None:
    assert run_script("benchmarks/mnist_paper.py", "--smoke", "--out", str(tmp_path)) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| smoke | 10 |" in summary


def test_step_time_smoke(tmp_path: Path, run_script) -> None:
    assert run_script("benchmarks/step_time.py", "--smoke", "--out", str(tmp_path)) == 0
    table = (tmp_path / "table.md").read_text()
    assert "| 10k |" in table and "bf16 state bytes/param" in table
    assert table.strip().splitlines()[-1].endswith("| 160 |")


def test_step_memory_smoke(tmp_path: Path, run_script) -> None:
    assert run_script("benchmarks/step_memory.py", "--smoke", "--out", str(tmp_path)) == 0
    rows = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert {(r["optimizer"], r["dtype"]) for r in rows} == {
        (o, d) for o in ("Adam", "LSTMOptimizer") for d in ("float32", "float16")
    }
    assert all(r["step_peak_bytes_per_param"] >= 0 and r["step_seconds"] > 0 for r in rows)
    state = {(r["optimizer"], r["dtype"]): r["state_bytes_per_param"] for r in rows}
    assert round(state["Adam", "float32"]) == 8 and round(state["LSTMOptimizer", "float32"]) == 160


def test_matrix_step_time_smoke(tmp_path: Path, run_script) -> None:
    args = ["--d-model", "16", "--threads", "1", "--steps", "1", "--rounds", "1"]
    assert run_script("benchmarks/matrix_step_time.py", *args, "--out", str(tmp_path)) == 0
    table = (tmp_path / "table.md").read_text()
    names = ("Adam", "general-v5", "general-v6", "general-v7", "general-v7, lstm=False")
    assert all(f"| {name} |" in table for name in names)
    rows = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert {r["optimizer"] for r in rows} == set(names)
    assert all(r["step"] > 0 and r["fwd_bwd"] > 0 for r in rows)
    state = {r["optimizer"]: r["state_bytes"] for r in rows}
    assert 8 <= state["Adam"] < 9 and 12 <= state["general-v7, lstm=False"] < 13  # + per tensor
    assert 160 <= state["general-v7"] < 161


def test_meta_train_throughput_smoke(tmp_path: Path, run_script) -> None:
    out = str(tmp_path)
    assert (
        run_script("benchmarks/meta_train_throughput.py", "--smoke", "--out", out, "--threads", "1")
        == 0
    )
    table = (tmp_path / "table.md").read_text()
    assert "| 5 | off | fused | glibc default |" in table and "| 5 | S = 3 | fused |" in table


def test_distributed_throughput_smoke(tmp_path: Path, run_script) -> None:
    assert (
        run_script("benchmarks/distributed_throughput.py", "--smoke", "--out", str(tmp_path)) == 0
    )
    assert "2 processes / 1 process" in (tmp_path / "table.md").read_text()


def test_bf16_quality_smoke(tmp_path: Path, run_script) -> None:
    assert run_script("benchmarks/bf16_quality.py", "--smoke", "--out", str(tmp_path)) == 0
    table = (tmp_path / "table.md").read_text()
    assert "| final_train_loss |" in table and "bf16 / fp32" in table
    assert (tmp_path / "records.jsonl").stat().st_size > 0


def test_meta_gradient_bias_smoke(tmp_path: Path, run_script) -> None:
    """The exact (second-order) gradient's finite-difference slope is minus its norm: the
    benchmark's check of its own measurement."""
    assert run_script("benchmarks/meta_gradient_bias.py", "--smoke", "--out", str(tmp_path)) == 0
    record = json.loads((tmp_path / "records.jsonl").read_text().splitlines()[0])
    assert record["so_slope"] == pytest.approx(-record["so_norm"], rel=0.1)
    assert -1.0 <= record["cosine"] <= 1.0


def test_ablations_mix_a_constant_share_of_adams_direction_into_muons() -> None:
    """For a rule that moves matrices along Muon's direction, two variants mix Adam's in at a
    constant 0.3 or -0.3 (a zero mix read-out, a constant bias); the rule itself is untouched."""
    import math
    import runpy

    import torch

    from learned_opt import load_rule, pretrained

    ablations = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks/ablations.py"))
    rule = load_rule(pretrained.path("general-v6"))[0].unwrapped
    found = ablations["variants"](rule)
    for name, t in (("direction 30% towards Adam's", 0.3), ("direction 30% beyond Muon's", -0.3)):
        mixed, schedule = found[name]
        assert schedule is None and mixed.orthogonal_mix and not rule.orthogonal_mix
        assert torch.count_nonzero(mixed.mix_weight) == 0
        assert math.tanh(mixed.mix_bias.item()) == pytest.approx(t)
    plain = ablations["variants"](load_rule(pretrained.path("general-v5"))[0].unwrapped)
    assert not any(name.startswith("direction") for name in plain)


def test_ablations_reach_inside_a_schedule_and_zero_the_lstm_read_out_alone() -> None:
    """For rules wrapped in a schedule (the default), the ablations still switch off the
    adaptation and mix the directions; ``LSTM read-out zeroed`` changes only the LSTM's
    per-coordinate read-out, where ``learned output zeroed`` also zeroes the adaptation."""
    import runpy

    import torch

    from learned_opt import load_rule, pretrained

    ablations = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks/ablations.py"))
    rule, _ = load_rule(pretrained.path("general-v7"))
    found = ablations["variants"](rule)
    assert {"LSTM read-out zeroed", "adaptation off", "direction 30% towards Adam's"} <= set(found)
    given = dict(rule.named_parameters())
    readout = dict(found["LSTM read-out zeroed"][0].named_parameters())
    changed = {n for n, p in readout.items() if not torch.equal(p, given[n])}
    assert changed == {"base.out_weight", "base.out_bias"}
    assert all(float(readout[n].abs().max()) == 0.0 for n in changed)
    zeroed = dict(found["learned output zeroed"][0].named_parameters())
    assert {n for n, p in zeroed.items() if not torch.equal(p, given[n])} > changed
    off = found["adaptation off"][0]
    assert type(off) is type(rule) and off.config()["base_config"]["lr_adapt"] == 0.0
    assert not off.config()["base_config"]["lr_adapt_learned"]
    assert torch.equal(off.schedule[-1].weight, rule.schedule[-1].weight)  # the schedule kept
    plain, _ = load_rule(pretrained.path("general"))  # the LSTM is all it learns
    assert "LSTM read-out zeroed" not in ablations["variants"](plain)


def test_ablations_smoke(tmp_path: Path, run_script) -> None:
    """A rule whose learned output is already zero (a fresh rule with a zero adaptation gain
    and drift) equals its zeroed variants exactly; the other variants change the runs."""
    from learned_opt import save_rule
    from learned_opt.rules import LSTMCorrectedAdamRule

    weights = tmp_path / "fresh.pt"
    save_rule(weights, LSTMCorrectedAdamRule(controller_hidden=4, controller_drift=0.5))
    out = tmp_path / "out"
    # small families keep it quick (the default, the validation group, evaluates conv nets)
    argv = ["--weights", str(weights), "--steps", "8", "--tasks", "2", "--out", str(out)]
    assert run_script("benchmarks/ablations.py", *argv, "--family", "digits") == 0
    lines = (out / "records.jsonl").read_text().splitlines()
    rows = {r["variant"]: r for r in map(json.loads, lines[1:])}
    assert rows["learned output zeroed"]["final_losses"] == rows["as given"]["final_losses"]
    assert rows["learned drift off"]["final_losses"] == rows["as given"]["final_losses"]
    assert rows["rate x2"]["final_losses"] != rows["as given"]["final_losses"]
    assert rows["cosine decay"]["final_losses"] != rows["as given"]["final_losses"]
    assert rows["adaptation off"]["final_losses"] != rows["as given"]["final_losses"]
    assert any(name.startswith("Adam, lr") for name in rows)
    assert "| as given |" in (out / "table.md").read_text()
    argv += ["--family", "diverse", "--only", "rate x2", "--out", str(tmp_path / "mt")]
    # a name that holds a comma is one variant; a comma list is several
    argv += ["--only", "adaptation off, output zeroed", "--only", "cosine decay,rate x0.5"]
    assert run_script("benchmarks/ablations.py", *argv) == 0
    head, *rows = map(json.loads, (tmp_path / "mt" / "records.jsonl").read_text().splitlines())
    assert head["family"] == "diverse" and len(head["tasks"]) == 2
    from learned_opt.evaluate import DEFAULT_LR_GRID

    grid = sorted(DEFAULT_LR_GRID)  # Adam's tuned rate, and whether it is at the grid's edge
    assert head["adam_lr"] in grid
    assert head["adam_lr_at_edge"] == (head["adam_lr"] in (grid[0], grid[-1]))
    assert [r["variant"] for r in rows[1:]] == [
        "as given", "rate x2", "adaptation off, output zeroed", "cosine decay", "rate x0.5"
    ]  # fmt: skip


def test_selection_noise_scores_as_the_meta_trainer_and_measures_the_spread(
    tmp_path: Path, run_script
) -> None:
    """At multiplier 1 the metric is the meta-trainer's held-out metric of the same weights on
    the same tasks; the same multiplier twice has no spread, another one some."""
    import learned_opt
    from learned_opt import load_rule
    from learned_opt.outer import MetaTrainConfig
    from learned_opt.outer.held_out import HeldOut
    from learned_opt.tasks import make_family

    args = ["--steps", "4", "--tasks", "3", "--subsets", "2,3", "--procs", "1"]
    assert run_script("benchmarks/selection_noise.py", *args, "--scales", "1,1,1.5",
                      "--out", str(tmp_path)) == 0  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().split("\n")
               if line]  # fmt: skip
    assert len(records) == 9 and {r["task"] for r in records} == {0, 1, 2}
    config = MetaTrainConfig(
        family="quadratic", eval_tasks=3, eval_horizon=4, objective="final-train",
        log_meta_loss=True,
    )  # fmt: skip
    rule = load_rule(learned_opt.pretrained.path(learned_opt.pretrained.DEFAULT))[0]
    metric, _ = HeldOut(config, make_family("validation")).evaluate_rule(rule)
    row = (tmp_path / "table.md").read_text().strip().splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "3" and float(cells[1]) == pytest.approx(metric, rel=1e-3)
    assert cells[1] == cells[2] and cells[3] != cells[1] and cells[4] != "0.0%"
    same = [r["final_train_loss"] for r in records if r["scale"] == 1]
    assert same[:3] == same[3:]
    refused = run_script("benchmarks/selection_noise.py", *args, "--subsets", "4", "--out", "x")
    assert refused == 2 and not Path("x").exists()


def test_member_comparison_runs_every_rule_on_the_same_tasks_of_every_member(
    tmp_path: Path, run_script
) -> None:
    """Each rule runs the same tasks of every member of the group: a rule against itself has
    ratio 1 on every member; another rule differs; bad rules and families are refused."""
    args = ["--family", "validation", "--steps", "3", "--seeds", "2", "--procs", "1"]
    out = tmp_path / "cmp"
    assert run_script("benchmarks/member_comparison.py", *args, "--weights", "general-v7",
                      "--weights", "general-v7", "--weights", "general-v6",
                      "--out", str(out)) == 0  # fmt: skip
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 5 * 2
    members = {r["member"] for r in records}
    from learned_opt.tasks.groups import GROUPS

    assert members == {m.name for m in GROUPS["validation"].members}
    rows = [line for line in (out / "table.md").read_text().splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in members]  # fmt: skip
    assert len(rows) == 5
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == "1.000"  # the same rule, the same tasks
    assert any(row.strip("|").split("|")[3].strip() != "1.000" for row in rows)
    for bad in (
        ["--weights", "general-v7", "--weights", "no-such-file.pt"],
        ["--weights", "general-v7"],
        ["--weights", "general-v7", "--weights", "general-v6", "--family", "quadratic"],
    ):
        assert run_script("benchmarks/member_comparison.py", *args, *bad, "--out", "x") == 2
    assert not Path("x").exists()


def test_member_comparison_untold_never_tells_a_rule_the_runs_length(
    tmp_path: Path, run_script
) -> None:
    """``--untold``: a rule that reads the run's length runs as without it (here against the
    default told, on the same tasks: it differs), and the records and table say so."""
    args = ["--family", "validation", "--steps", "12", "--seeds", "1", "--procs", "1",
            "--weights", "general-v7", "--weights", "general-v7"]  # fmt: skip
    told, untold = tmp_path / "told", tmp_path / "untold"
    assert run_script("benchmarks/member_comparison.py", *args, "--out", str(told)) == 0
    assert run_script("benchmarks/member_comparison.py", *args, "--untold",
                      "--out", str(untold)) == 0  # fmt: skip

    def losses(out: Path) -> list[tuple[bool, float]]:
        lines = (out / "records.jsonl").read_text().splitlines()
        return [(r["told"], r["final_train_loss"]) for r in map(json.loads, lines)]

    assert all(t for t, _ in losses(told)) and not any(t for t, _ in losses(untold))
    assert [v for _, v in losses(told)] != [v for _, v in losses(untold)]
    assert "not told the length" in (untold / "table.md").read_text()


def test_the_worst_task_of_a_sealed_table_is_nan_when_any_ratio_is() -> None:
    """A diverged run (a NaN ratio) is the worst task, wherever it comes (``max`` skips a NaN
    that does not come first)."""
    import math
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from sealed_report import _worst

    assert math.isnan(_worst([0.9, float("nan"), 1.1]))
    assert math.isnan(_worst([float("nan"), 0.9]))
    assert _worst([0.9, 1.1]) == 1.1


def _time_to_target(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    lrs: dict[float, float],
    lstm: list[float],
    lstm_diverged: bool = False,
) -> tuple[dict[str, dict], str]:
    """``benchmarks/time_to_target.py`` at tiny sizes with its training replaced: each tuning
    run ends at the validation loss ``lrs`` gives its learning rate, tuned AdamW's smoothed loss
    goes down to 2.0 in 6 steps, the LSTMOptimizer's is ``lstm`` (then non-finite if
    ``lstm_diverged``). Returns the records by run and the table."""
    import importlib

    import torch

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    ttt = importlib.import_module("time_to_target")
    adamw = [3.0, 2.5, 2.2, 2.1, 2.05, 2.0]

    def train_together(runs: list, steps: int) -> list[dict]:
        for r in runs:
            if r.name.startswith("tune_adamw_lr"):
                losses = [3.0] * steps
                r.evals = [(steps, 0.1 * steps, lrs[float(r.name.removeprefix("tune_adamw_lr"))])]
            else:
                losses = adamw if r.name == "adamw" else lstm
                r.diverged = r.name == "lstm" and lstm_diverged
                r.evals = [(len(losses), 0.1 * len(losses), losses[-1])]
            r.curve = [(k, 0.1 * k, v) for k, v in enumerate(losses, 1)]
            r.clock = 0.1 * len(losses)
        return [r.record() for r in runs]

    monkeypatch.setattr(ttt, "train_together", train_together)
    lr_grid = ",".join(f"{lr:g}" for lr in lrs)
    argv = ["--steps", "6", "--tune-steps", "3", "--lrs", lr_grid, "--layers", "1"]
    argv += ["--d-model", "16", "--heads", "2", "--context", "8", "--batch", "2"]
    argv += ["--eval-batches", "1", "--threads", str(torch.get_num_threads())]
    assert ttt.run([*argv, "--out", str(tmp_path)]) == 0
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    records = {r["run"]: r for r in map(json.loads, lines)}
    return records, (tmp_path / "table.md").read_text()


def test_time_to_target_flags_a_tuned_learning_rate_at_the_edge_of_its_grid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The best rate the largest of the grid: a warning, ``lr_at_edge`` in tuned AdamW's record
    and the table says so; the best rate inside the grid: none of these."""
    lstm = [3.0, 2.8, 2.6, 2.4, 2.3, 2.2]
    records, table = _time_to_target(tmp_path / "edge", monkeypatch, {1e-3: 4.0, 1e-2: 3.0}, lstm)
    assert records["adamw"]["lr"] == 1e-2 and records["adamw"]["lr_at_edge"] is True
    assert records["lstm"]["lr_at_edge"] is None  # untuned
    assert "edge of the grid" in capsys.readouterr().err
    assert "chosen 0.01, at the edge of the grid" in table
    assert "| AdamW (lr 0.01, tuned, at the edge of the grid) |" in table
    grid = {1e-3: 4.0, 1e-2: 3.0, 1e-1: 3.5}
    records, table = _time_to_target(tmp_path / "inside", monkeypatch, grid, lstm)
    assert records["adamw"]["lr"] == 1e-2 and records["adamw"]["lr_at_edge"] is False
    assert "edge" not in capsys.readouterr().err and "edge" not in table


def test_time_to_target_counts_only_runs_that_keep_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that reaches tuned AdamW's final loss (2.0) and then diverges, or ends far above
    it, has no time to target (only when it first reached it); one that ends within the margin
    of it counts."""
    grid = {1e-3: 4.0, 1e-2: 3.0, 1e-1: 3.5}
    runs = {
        "diverged": ([3.0, 1.9, 1.8], True),
        "not held": ([3.0, 2.5, 1.9, 1.8, 2.4, 2.6], False),
        "reached": ([3.0, 2.5, 1.9, 1.8, 2.0, 2.05], False),
        "not reached": ([3.0, 2.8, 2.6, 2.4, 2.3, 2.2], False),
    }
    for status, (lstm, diverged) in runs.items():
        records, table = _time_to_target(tmp_path / status, monkeypatch, grid, lstm, diverged)
        adam, run = records["adamw"], records["lstm"]
        assert adam["steps_to_target"] == 6
        if status == "reached":
            assert run["steps_to_target"] == 3
            assert run["seconds_to_target"] == pytest.approx(0.3)
            assert "LSTMOptimizer reaches the target in 0.50x" in table
        else:
            assert run["steps_to_target"] is None and run["seconds_to_target"] is None, status
            assert "reaches the target in" not in table
        assert adam["target_status"] == "reached" and run["target_status"] == status
        first = next((k for k, v in enumerate(lstm, 1) if v <= 2.0), None)
        assert run["first_reached_step"] == first
    assert records["lstm"]["diverged"] is False
    records, table = _time_to_target(tmp_path / "d", monkeypatch, grid, *runs["diverged"])
    assert records["lstm"]["diverged_at_step"] == 4
    assert "| diverged (at 2) |" in table and "after reaching the target at step 2" in table


def test_ablations_write_provenance(tmp_path: Path, run_script) -> None:
    """Beside its records and table, ``benchmarks/ablations.py`` writes what they were measured
    with (the shared ``provenance.json``)."""
    import torch

    from learned_opt import save_rule
    from learned_opt.rules import LSTMCorrectedAdamRule

    weights = tmp_path / "fresh.pt"
    save_rule(weights, LSTMCorrectedAdamRule())
    argv = ["--weights", str(weights), "--steps", "2", "--tasks", "1", "--family", "digits"]
    argv += ["--only", "rate x2", "--threads", str(torch.get_num_threads())]
    assert run_script("benchmarks/ablations.py", *argv, "--out", str(tmp_path / "out")) == 0
    made = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert {"command", "commit", "torch", "cpu", "cores", "threads"} <= set(made)
    assert "ablations.py" in made["command"] and made["torch"] == torch.__version__
    assert (tmp_path / "out" / "records.jsonl").read_text().count("\n") == 4  # head + 3 rows


def test_eval_writes_provenance_beside_its_records(tmp_path: Path) -> None:
    """``learned-opt eval --records`` writes the provenance beside the records:
    ``provenance.json`` for ``records.jsonl`` (the benchmarks' layout), ``<stem>.provenance.json``
    for another name."""
    from learned_opt.cli import main

    argv = ["eval", "--weights", "quadratic", "--family", "quadratic", "--steps", "3"]
    argv += ["--seeds", "1", "--tune-seeds", "1", "--lrs", "0.1"]
    for name, expected in (("records.jsonl", "provenance.json"), ("r.jsonl", "r.provenance.json")):
        assert main([*argv, "--records", str(tmp_path / name)]) == 0
        made = json.loads((tmp_path / expected).read_text())
        assert {"command", "commit", "torch", "cpu", "cores", "threads"} <= set(made)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "provenance.json", "r.jsonl", "r.provenance.json", "records.jsonl"
    ]  # fmt: skip


def test_records_are_written_whole_or_not_at_all(tmp_path: Path) -> None:
    from learned_opt.report import read_jsonl, write_jsonl

    path = tmp_path / "records.jsonl"
    write_jsonl(path, [{"loss": 1.0}, {"loss": float("nan")}])
    rows = read_jsonl(path)
    assert rows[0] == {"loss": 1.0} and rows[1]["loss"] != rows[1]["loss"]  # NaN reads back

    def interrupted():
        yield {"loss": 2.0}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_jsonl(path, interrupted())
    assert len(read_jsonl(path)) == 2 and [p.name for p in tmp_path.iterdir()] == [path.name]
