"""Every benchmark has a --smoke mode, run here."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_eval_vs_tuned_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["eval_vs_tuned.py", "--smoke", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "benchmarks" / "eval_vs_tuned.py"), run_name="__main__")
    assert exit_info.value.code == 0
    assert "mean / adam" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "records.jsonl").stat().st_size > 0
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_mnist_paper_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["mnist_paper.py", "--smoke", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "benchmarks" / "mnist_paper.py"), run_name="__main__")
    assert exit_info.value.code == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| smoke | 10 |" in summary


def test_step_time_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["step_time.py", "--smoke", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "benchmarks" / "step_time.py"), run_name="__main__")
    assert exit_info.value.code == 0
    assert "| 10k |" in (tmp_path / "table.md").read_text()


def test_meta_train_throughput_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        sys,
        "argv",
        ["meta_train_throughput.py", "--smoke", "--out", str(tmp_path), "--threads", "1"],
    )
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "benchmarks" / "meta_train_throughput.py"), run_name="__main__")
    assert exit_info.value.code == 0
    assert "| 5 |" in (tmp_path / "table.md").read_text()


def test_distributed_throughput_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        sys, "argv", ["distributed_throughput.py", "--smoke", "--out", str(tmp_path)]
    )
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "benchmarks" / "distributed_throughput.py"), run_name="__main__")
    assert exit_info.value.code == 0
    assert "2 processes / 1 process" in (tmp_path / "table.md").read_text()
