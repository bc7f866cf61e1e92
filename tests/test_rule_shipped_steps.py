"""The shipped weights take exactly the steps they took when they were shipped.

``tests/fixtures/shipped_steps.pt`` holds, for each shipped weights file, the parameters and a few
state entries of ``LSTMOptimizer(params, weights=name)`` after 20 steps on a small model with
fixed gradients (several tensors of various shapes; gradients of several scales, a spike that the
default rule's clipping cuts, a tensor whose gradient decays far below its peak, a tensor whose
gradient is zero at first). The fixture was written by the implementation before it was
refactored; any change of the rules' code must leave every bit of it as it is.

Regenerate (only when the math is meant to change) with::

    python tests/test_rule_shipped_steps.py --write
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from learned_opt import LSTMOptimizer

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "shipped_steps.pt"
SHAPES = [(7, 5), (5,), (3, 4, 2), (1,), (9, 11)]
STEPS = 20
#: (weights, parameter dtype) of each recorded run.
RUNS = [
    ("general", torch.float32),
    ("general", torch.float64),
    ("paper-mnist", torch.float32),
    ("quadratic", torch.float32),
]
#: The tensor whose whole state is recorded (the one-element tensor).
SMALL_TENSOR = 3


def gradient(k: int, t: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A deterministic gradient for tensor ``k`` at step ``t`` (1-based), from integer arithmetic
    only (the same bits on every machine and torch version): values in [-1, 1] times a
    per-tensor scale; tensor 0 gets a spike at step 12, tensor 2 decays by 0.7 per step, tensor
    3 is zero for the first three steps."""
    n = 1
    for s in shape:
        n *= s
    values = [((i * 7919 + t * 104729 + k * 1299709) % 2001 - 1000) / 1000.0 for i in range(n)]
    g = torch.tensor(values, dtype=torch.float64).reshape(shape)
    scale = (1e-3, 1.0, 0.5, 20.0, 3e-2)[k]
    if k == 0 and t == 12:
        scale *= 100.0
    if k == 2:
        scale *= 0.7**t
    if k == 3 and t <= 3:
        scale = 0.0
    return g * scale


def run(weights: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The parameters and a few state entries after :data:`STEPS` steps."""
    params = [
        torch.nn.Parameter(torch.full(shape, 0.1 * (k + 1), dtype=dtype))
        for k, shape in enumerate(SHAPES)
    ]
    opt = LSTMOptimizer(params, weights=weights)
    for t in range(1, STEPS + 1):
        for k, p in enumerate(params):
            p.grad = gradient(k, t, p.shape).to(dtype)
        opt.step()
    out: dict[str, torch.Tensor] = {}
    for k, p in enumerate(params):
        out[f"param{k}"] = p.detach().clone()
        state = opt.state[p]
        for key in ("log_step", "grad_fast", "grad_peak"):  # one number per tensor
            if key in state:
                out[f"{key}{k}"] = state[key].reshape(-1)[0].clone()
    state = opt.state[params[SMALL_TENSOR]]
    for key, value in state.items():
        if key not in ("log_step", "grad_fast", "grad_peak"):
            out[f"{key}{SMALL_TENSOR}"] = value.clone()
    return out


def pack(values: dict[str, torch.Tensor]) -> dict[str, object]:
    """The raw bytes of every tensor in one uint8 tensor, and the layout to read them back."""
    layout = [[k, str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in values.items()]
    raw = [v.contiguous().reshape(-1).view(torch.uint8) for v in values.values()]
    return {"layout": layout, "bytes": torch.cat(raw)}


def unpack(packed: dict) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for key, dtype, shape in packed["layout"]:
        dt = getattr(torch, dtype)
        size = torch.empty(shape, dtype=dt).numel() * torch.empty((), dtype=dt).element_size()
        out[key] = packed["bytes"][start : start + size].view(dt).reshape(shape)
        start += size
    return out


def name(weights: str, dtype: torch.dtype) -> str:
    return f"{weights}/{str(dtype).removeprefix('torch.')}"


def machine() -> str:
    """The compiled kernels' rounding depends on the CPU (``-march=native``; approximate
    reciprocals differ between vendors): bits are compared on the machine kind that recorded
    the fixture, with the kernels built, and to a tight tolerance elsewhere."""
    from learned_opt import kernels

    return kernels._cpu_fingerprint() if kernels.available() else "pure-pytorch"


def record() -> dict[str, object]:
    return {"machine": machine(), **{name(w, d): pack(run(w, d)) for w, d in RUNS}}


@pytest.mark.parametrize("weights,dtype", RUNS)
def test_shipped_weights_take_the_recorded_steps_bit_for_bit(
    weights: str, dtype: torch.dtype
) -> None:
    fixture = torch.load(FIXTURE, weights_only=True)
    want = unpack(fixture[name(weights, dtype)])
    got = run(weights, dtype)
    assert sorted(got) == sorted(want)
    exact = fixture["machine"] == machine()
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        if exact:  # bit for bit (torch.equal would take -0.0 for 0.0)
            assert torch.equal(
                got[key].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)
            ), key
        else:  # another CPU's kernel rounding (measured: at most 1e-4 relative after 20 steps)
            torch.testing.assert_close(got[key], value, rtol=1e-3, atol=1e-6, msg=key)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit(__doc__)
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    torch.save(record(), FIXTURE)
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")
