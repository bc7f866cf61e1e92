"""The out-of-distribution benchmark's --smoke mode (shipped paper-mnist weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from learned_opt.evaluate import RunResult, geometric_mean, seeds_won
from learned_opt.ood import OOD_TASKS, parse_weights
from learned_opt.tasks import make_family


def test_ood_smoke(tmp_path: Path, run_script, monkeypatch: pytest.MonkeyPatch) -> None:
    # The pure-PyTorch LSTM path: no kernel compilation inside a timed smoke test.
    monkeypatch.setenv("LEARNED_OPT_NO_EXT", "1")
    assert run_script("benchmarks/ood.py", "--smoke", "--out", str(tmp_path)) == 0
    table = (tmp_path / "table.md").read_text()
    assert "**geometric mean, all**" in table and "| wine-mlp-tanh-32 | 6 |" in table
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    tasks = {r["benchmark_task"] for r in records}
    assert len(tasks) == 5 and {r["steps"] for r in records} == {3, 6}
    assert {r["optimizer"] for r in records} == {"adam", "learned:paper-mnist"}
    pngs = sorted((tmp_path / "curves").glob("*.png"))
    assert len(pngs) == 10 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_ood_tasks_are_outside_the_diverse_distribution() -> None:
    """No OOD task's architecture and batch size are all among the choices of a "diverse" member
    of the same kind on the same dataset."""
    members = make_family("diverse").config()["members"]
    choices = {"name", "dataset", "holdout", "test_batch_size"}
    for name, make in OOD_TASKS.items():
        config = make("val").config()
        for member in members:
            if (member["name"], member["dataset"]) != (config["name"], config["dataset"]):
                continue
            keys = [k for k in config if k not in choices]
            assert not all(set(config[k]) <= set(member[k]) for k in keys), name
    assert geometric_mean([0.5, 2.0]) == pytest.approx(1.0)
    assert geometric_mean([1.0, float("inf")]) == float("inf")


def test_ood_compares_several_weights_against_one_tuned_adam(tmp_path: Path, run_script) -> None:
    argv = ["--smoke", "--weights", "mine=paper-mnist,quadratic", "--tasks", "wine-mlp-tanh-32"]
    assert run_script("benchmarks/ood.py", *argv, "--out", str(tmp_path)) == 0
    table = (tmp_path / "table.md").read_text()
    assert "| task | steps | Adam lr | Adam final loss | mine | quadratic |" in table
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    names = [r["optimizer"] for r in records if r["steps"] == 3]
    assert sorted(set(names)) == ["adam", "learned:mine", "learned:quadratic"]
    assert len(names) == 3  # one seed each: the Adam runs are shared
    assert parse_weights("a.pt, b=c.pt") == {"a": "a.pt", "b": "c.pt"}
    with pytest.raises(ValueError, match="Duplicate"):
        parse_weights("x=a.pt,x=b.pt")


def test_seeds_won_pairs_runs_by_task_seed(tmp_path: Path, run_script) -> None:

    def run(seed: int, loss: float) -> RunResult:
        return RunResult("", 1.0, seed, [], loss, loss, 0.0)

    adam = [run(1, 0.5), run(2, 0.1), run(3, 0.2)]
    a = [run(1, 0.4), run(2, 0.2), run(3, float("nan"))]  # won, lost (paired), diverged
    assert seeds_won(a, adam) == 1
    assert seeds_won([run(2, 0.05)], adam) == 1
    assert seeds_won([], adam) == 0
    argv = ["--smoke", "--weights", "mine=paper-mnist", "--tasks", "wine-mlp-tanh-32"]
    assert run_script("benchmarks/ood.py", *argv, "--out", str(tmp_path)) == 0
    table = (tmp_path / "table.md").read_text()
    section = table.split("## Seeds won")[1].split("##")[0]
    rows = [line for line in section.splitlines() if line.startswith("| wine")]
    assert len(rows) == 2 and all(line.endswith("/1 |") for line in rows)  # one seed, 2 horizons
