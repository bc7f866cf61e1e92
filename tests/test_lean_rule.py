"""The LSTM-corrected Adam rule without its LSTM (``lstm=False``): the hand-designed direction
moved by the per-tensor step size alone, step for step the rule with its read-out at zero, with
12 bytes of state per parameter."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch

from learned_opt import LearnedOptimizer, LSTMOptimizer, load_rule, pretrained, save_rule
from learned_opt.rules import LSTMCorrectedAdamConfig, LSTMCorrectedAdamRule

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from sealed_optimizers import zero_readout  # noqa: E402

SHAPES = [(), (5,), (7, 3), (30, 25), (700,), (4, 3, 2), (0, 3)]


def _default_and_lean():
    """The default weights, the same with the LSTM's read-out at zero, and without the LSTM."""
    rule, _ = load_rule(pretrained.path(pretrained.DEFAULT))
    zeroed = copy.deepcopy(rule)
    with torch.no_grad():
        zeroed.unwrapped.out_weight.zero_()
        zeroed.unwrapped.out_bias.zero_()
    lean = copy.deepcopy(rule)
    lean.base = rule.base.variant(lstm=False)
    return rule, zeroed, lean


def _gradients(steps, dtype=torch.float32):
    """Gradients of :data:`SHAPES` for ``steps`` steps, from 1e-3 to 10 in size."""
    gen = torch.Generator().manual_seed(1)
    return [
        [(torch.randn(s, generator=gen) * 10.0 ** (k % 5 - 3)).to(dtype) for s in SHAPES]
        for k in range(steps)
    ]


def _params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def _steps(opt, params, grads) -> None:
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()


def _drop_in_run(rule, total_steps=None, dtype=torch.float32, steps=25):
    params = _params(dtype)
    opt = LSTMOptimizer(params, weights=copy.deepcopy(rule), total_steps=total_steps)
    _steps(opt, params, _gradients(steps, dtype))
    return params, opt


@pytest.mark.parametrize("total_steps", [None, 40])
def test_the_drop_in_step_is_the_default_with_its_read_out_zeroed(total_steps) -> None:
    """Told the run's length or not, every parameter ends bit for bit where the default rule
    with a zero read-out leaves it (whose step is the fused kernel's, the lean rule's the
    forward's), and the lean state holds Adam's momentum, second moment and last direction
    alone per coordinate: 12 bytes per parameter against 160."""
    rule, zeroed, lean = _default_and_lean()
    want, opt_z = _drop_in_run(zeroed, total_steps)
    got, opt_l = _drop_in_run(lean, total_steps)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    moved, _ = _drop_in_run(rule, total_steps)  # the read-out does move the default
    assert any(not torch.equal(a, b) for a, b in zip(moved, want))
    p = got[3]

    def per_coordinate_bytes(opt, p):
        state = opt.state[p]
        return sum(v.numel() * v.element_size() for v in state.values() if v.dim() and
                   v.shape[0] == p.numel()) / p.numel()  # fmt: skip

    assert {k for k, v in opt_l.state[p].items() if v.dim() and v.shape[0] == p.numel()} == {
        "m0",
        "v",
        "prev",
    }
    assert per_coordinate_bytes(opt_l, p) == 12
    assert per_coordinate_bytes(opt_z, want[3]) == 160


def test_a_flat_vector_of_several_tensors_steps_as_the_zeroed_read_out() -> None:
    """The meta-learner's path: one flat vector of several tensors (Muon's direction for its
    matrices), updates and per-tensor state bit for bit those of the zeroed read-out, and the
    controller's meta-gradient flows through the unrolled steps."""
    _, zeroed, lean = _default_and_lean()
    numels = [math.prod(s) for s in SHAPES]
    n = sum(numels)
    states = [r.init_state(n, like=torch.zeros(n), numels=numels, shapes=SHAPES)
              for r in (zeroed, lean)]  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        g = torch.randn(n, generator=gen)
        (want, states[0]), (got, states[1]) = zeroed(g, states[0]), lean(g, states[1])
        assert torch.equal(got, want)
    for key in ("log_step", "cos_avg", "grad_fast", "grad_peak", "prev", "v"):
        assert torch.equal(states[1][key], states[0][key]), key
    got.sum().backward()
    grads = {n: p.grad for n, p in lean.named_parameters() if p.grad is not None}
    assert any(n.endswith("controller_linear") for n in grads)
    assert not any("weight_ih" in n or "out_weight" in n for n, _ in lean.named_parameters())


def test_zeroing_its_learned_part_is_the_default_zeroed() -> None:
    """The sealed benchmark's ``learned-zeroed`` of the lean rule (its controller and schedule
    at zero) steps as the default's, bit for bit."""
    _, zeroed, lean = _default_and_lean()
    want, _ = _drop_in_run(zero_readout(zeroed), 20, steps=10)
    got, _ = _drop_in_run(zero_readout(lean), 20, steps=10)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_saved_and_loaded_it_resumes_exactly(tmp_path) -> None:
    """Saved with ``save_rule`` and loaded, it is the same rule (no LSTM weights in the file);
    the optimizer's ``state_dict`` resumes it step for step, with bfloat16 parameters too."""
    _, _, lean = _default_and_lean()
    save_rule(tmp_path / "lean.pt", lean, {"source": "test"})
    loaded, _ = load_rule(tmp_path / "lean.pt")
    assert not loaded.unwrapped.lstm
    assert not any("lstm" in n or "out_" in n for n, _ in loaded.named_parameters())
    for dtype in (torch.float32, torch.bfloat16):
        grads = _gradients(8, dtype)
        full, _ = _drop_in_run(lean, 30, dtype=dtype, steps=8)
        params = _params(dtype)
        opt = LSTMOptimizer(params, weights=tmp_path / "lean.pt", total_steps=30)
        _steps(opt, params, grads[:4])
        saved = copy.deepcopy(opt.state_dict())
        resumed = LSTMOptimizer(params, weights=tmp_path / "lean.pt", total_steps=30)
        resumed.load_state_dict(saved)
        _steps(resumed, params, grads[4:])
        for a, b in zip(params, full):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    "options",
    [{"nominal": False}, {"additive": True}, {"direction_correction": True},
     {"orthogonal": True, "orthogonal_mix": True}],
)  # fmt: skip
def test_options_that_read_the_lstm_need_it(options) -> None:
    with pytest.raises(ValueError, match="lstm|nominal"):
        LSTMCorrectedAdamConfig(lstm=False, **options)


def test_a_new_lean_rule_is_adam_with_its_adaptation() -> None:
    """Built from scratch without the LSTM (no adaptation, no clipping) it is Adam, bit for bit
    as the same rule with the LSTM at a zero read-out; it has no weights but its base rate."""
    lean = LSTMCorrectedAdamRule(lstm=False, lr_adapt=0.0, grad_clip=0.0)
    plain = LSTMCorrectedAdamRule(lr_adapt=0.0, grad_clip=0.0)
    assert [n for n, _ in lean.named_parameters()] == []
    params = [torch.nn.Parameter(torch.ones(4)) for _ in range(2)]
    opts = [LearnedOptimizer([params[0]], lean), LearnedOptimizer([params[1]], plain)]
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        g = torch.randn(4, generator=gen)
        for p, opt in zip(params, opts):
            p.grad = g.clone()
            opt.step()
    assert torch.equal(params[0], params[1])
