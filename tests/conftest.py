from __future__ import annotations

import pytest
import torch

from learned_opt import LSTMRule


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
