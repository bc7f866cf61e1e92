from __future__ import annotations

import random
import runpy
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from learned_opt import LSTMRule


@pytest.fixture(autouse=True)
def _seeded_global_generators() -> None:
    """Every test starts from the same global random state, whatever ran before it: a draw
    from the global generator (a weight a rule adds at initialization, say) is then the same
    in every run and every order of the tests."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


@pytest.fixture
def rule() -> LSTMRule:
    """A randomly initialized paper-sized LSTM rule (deterministic)."""
    torch.manual_seed(0)
    r = LSTMRule()
    r.reset_parameters(torch.Generator().manual_seed(0))
    # A larger read-out than the init so that trajectories move visibly in few steps.
    with torch.no_grad():
        r.out_weight.mul_(5.0)
    return r


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_script(monkeypatch: pytest.MonkeyPatch) -> Callable[..., object]:
    """Run a script of the repository (path relative to its root) as ``__main__`` with the
    given arguments; returns its exit code."""

    def run(relpath: str, *args: str) -> object:
        monkeypatch.setattr(sys, "argv", [Path(relpath).name, *args])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(ROOT / relpath), run_name="__main__")
        return exit_info.value.code

    return run
