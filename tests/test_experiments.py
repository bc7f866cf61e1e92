"""Experiment scripts run end to end in a --smoke mode."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_fewshot_compare_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["fewshot_compare.py", "--smoke", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "experiments" / "fewshot_compare.py"), run_name="__main__")
    assert exit_info.value.code == 0
    table = (tmp_path / "table.md").read_text()
    for learner in ("maml", "rnn", "lstm-optimizer", "scratch-adam"):
        assert learner in table
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
