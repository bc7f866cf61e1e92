"""Experiment scripts run end to end in a --smoke mode."""

from __future__ import annotations

from pathlib import Path


def test_fewshot_compare_smoke(tmp_path: Path, run_script) -> None:
    assert run_script("experiments/fewshot_compare.py", "--smoke", "--out", str(tmp_path)) == 0
    table = (tmp_path / "table.md").read_text()
    for learner in ("maml", "rnn", "lstm-optimizer", "scratch-adam"):
        assert learner in table
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_fewshot_compare_runs_only_the_learners_asked_for(tmp_path: Path, run_script) -> None:
    args = ("--smoke", "--learners", "maml,scratch-adam", "--out", str(tmp_path))
    assert run_script("experiments/fewshot_compare.py", *args) == 0
    table = (tmp_path / "table.md").read_text()
    assert "maml" in table and "scratch-adam" in table
    assert "| rnn |" not in table and "lstm-optimizer" not in table
