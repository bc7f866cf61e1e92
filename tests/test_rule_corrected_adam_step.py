"""The in-place step of LSTMCorrectedAdamRule (the drop-in optimizer's path) against its forward:
bit for bit on tensors of up to one block, to float32 rounding beyond; float64, bfloat16 state,
other configurations; independent of the thread count."""

from __future__ import annotations

import copy

import pytest
import torch

from learned_opt import LearnedOptimizer, kernels
from learned_opt.rules import LSTMCorrectedAdamConfig, LSTMCorrectedAdamRule
from learned_opt.rules import corrected_adam_step as cas
from learned_opt.rules.corrected_adam_config import GENERAL_LSTM_DEFAULTS

needs_kernels = pytest.mark.skipif(
    kernels._load_corrected_adam() is None, reason="fused kernels unavailable"
)


def _rule(base: LSTMCorrectedAdamConfig | None = None, **options) -> LSTMCorrectedAdamRule:
    """A rule with a random, large read-out (so that the LSTM moves the step visibly)."""
    rule = LSTMCorrectedAdamRule(base, **options).requires_grad_(False)
    rule.reset_parameters(torch.Generator().manual_seed(0), zero_output=False)
    with torch.no_grad():
        rule.out_weight.mul_(3.0)
        rule.out_bias.fill_(0.05)
    return rule


def _grads(n: int, steps: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Gradients of changing scales, with a spike (clipped) and a zero step."""
    gen = torch.Generator().manual_seed(n)
    out = []
    for step in range(steps):
        scale = 10.0 ** float(torch.randint(-5, 2, (1,), generator=gen))
        g = torch.randn(n, generator=gen, dtype=torch.float64) * scale
        if step == 6:
            g = g * 300.0
        if step == 3:
            g = g * 0.0
        out.append(g.to(dtype))
    return out


def _run(rule, grads, fused: bool, state_dtype: torch.dtype | None = None, precise=()):
    """The steps from a fresh state stored as ``state_dtype`` (the entries ``precise``: float32),
    by the in-place step (``fused``: the kernel where it takes them) or by the forward."""
    state = rule.init_state(grads[0].numel(), like=grads[0])
    if state_dtype is not None:
        state = {
            k: v.to(torch.float32 if k in precise else state_dtype)
            if v.is_floating_point() and rule.coord_dim(k) is not None
            else v
            for k, v in state.items()
        }
    if fused and kernels._load_corrected_adam() is not None and state_dtype is not None:
        assert cas._fused_ok(rule, grads[0], state)  # (float32 state: the tests below check)
    updates = []
    for g in grads:
        if fused:
            updates.append(cas.step_(rule, g, state))
        else:
            updates.append(cas._forward_step_(rule, g, state))
    return updates, state


def _assert_equal_runs(a, b) -> None:
    (ua, sa), (ub, sb) = a, b
    for x, y in zip(ua, ub):
        assert torch.equal(x, y)
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


CONFIGS = {
    "shipped": {},
    "additive": {"additive": True},
    "no-adaptation": {"lr_adapt": 0.0, "grad_clip": 0.0},
    "hidden-32-two-layers": {"hidden_size": 32, "num_layers": 2},
    "hidden-8": {"hidden_size": 8},  # not a multiple of 16: the 8-lane LSTM kernel
    # Adam's momentum none of the LSTM's (a fifth), v no slow average (the default weights')
    "adam-momenta": {"beta1": 0.8, "beta2": 0.95},
}


@needs_kernels
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("n", [1, 7, 99, 1000, cas.BLOCK])
def test_fused_step_is_the_forward_bit_for_bit_up_to_a_block(config: str, n: int) -> None:
    rule = _rule(**CONFIGS[config])
    grads = _grads(n, 12)
    assert cas._fused_ok(rule, grads[0], rule.init_state(n, like=grads[0]))
    _assert_equal_runs(_run(rule, grads, True), _run(rule, grads, False))


@needs_kernels
@pytest.mark.parametrize("config", ["shipped", "adam-momenta"])
def test_fused_step_with_bfloat16_state_is_the_forward_of_the_rounded_state(config: str) -> None:
    """bfloat16 state, the slow averages float32 (m3 and v with Adam's beta2; m3 alone with
    0.95)."""
    rule = _rule(**CONFIGS[config])
    grads = _grads(300, 10)
    for precise in ((), rule.precise_keys()):  # all bfloat16; the optimizer's layout
        fused = _run(rule, grads, True, torch.bfloat16, precise)
        assert fused[1]["h0"].dtype == torch.bfloat16
        assert fused[1]["log_step"].dtype == torch.float32
        assert {k for k, v in fused[1].items() if v.dtype == torch.float32} >= set(precise)
        _assert_equal_runs(fused, _run(rule, grads, False, torch.bfloat16, precise))


@pytest.mark.parametrize("beta1", [0.3, 0.998])
def test_a_fifth_momentum_the_kernels_do_not_take_steps_by_the_forward(beta1: float) -> None:
    """Adam's momentum with a weight 1 - beta1 of 0.5 or more (another lerp form), or a slow
    average (stored float32 beside bfloat16): the in-place step is the forward's."""
    rule = _rule(beta1=beta1)
    grads = _grads(300, 6)
    assert len(rule._state_betas) == 5 and not kernels.momenta_ok(rule)
    assert not cas._fused_ok(rule, grads[0], rule.init_state(300, like=grads[0]))
    _assert_equal_runs(_run(rule, grads, True), _run(rule, grads, False))


@needs_kernels
def test_the_fused_step_takes_every_shipped_corrected_adam_rule() -> None:
    """The shipped weights' step runs in the fused kernel (the forward is several times
    slower), with float32 state and with the optimizer's bfloat16 layout."""
    from learned_opt import LSTMOptimizer, pretrained

    for name in pretrained.available():
        for dtype in (None, torch.bfloat16):
            p = torch.nn.Parameter(torch.zeros(300))
            opt = LSTMOptimizer([p], weights=name, state_dtype=dtype)
            if not isinstance(opt.rule, LSTMCorrectedAdamRule):
                continue
            p.grad = torch.randn(300)
            opt.step()
            assert cas._fused_ok(opt.rule, p.grad, opt.state[p]), (name, dtype)


@needs_kernels
@pytest.mark.parametrize("n", [cas.BLOCK + 1, 3 * cas.BLOCK + 17])
def test_fused_step_matches_the_forward_on_several_blocks(n: int) -> None:
    """Beyond one block the per-tensor sums and the read-out's matrix product are split
    differently from PyTorch's whole-tensor ones: the same steps to float32 rounding."""
    rule = _rule()
    grads = _grads(n, 12)
    (fused, fs), (ref, rs) = _run(rule, grads, True), _run(rule, grads, False)
    for u, r in zip(fused, ref):
        torch.testing.assert_close(u, r, rtol=1e-4, atol=1e-6 * float(r.abs().max()))
    for key in rs:
        torch.testing.assert_close(fs[key], rs[key], rtol=1e-4, atol=1e-5)


@needs_kernels
def test_fused_step_does_not_depend_on_the_thread_count() -> None:
    rule = _rule()
    grads = _grads(5 * cas.BLOCK + 3, 6)
    threads = torch.get_num_threads()
    runs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            runs.append(_run(rule, grads, True))
    finally:
        torch.set_num_threads(threads)
    _assert_equal_runs(*runs)


@pytest.mark.parametrize("n", [5, 5000])
def test_float64_step_is_the_forward(n: int) -> None:
    rule = _rule().double()
    grads = _grads(n, 8, torch.float64)
    (fused, fs), (ref, rs) = _run(rule, grads, True), _run(rule, grads, False)
    for u, r in zip(fused, ref):
        torch.testing.assert_close(u, r, rtol=1e-12, atol=0.0)
    for key in rs:
        torch.testing.assert_close(fs[key], rs[key], rtol=1e-12, atol=0.0)


def _run_chunked(rule, grads, chunk: int, shape=None):
    """:func:`_run`'s steps by the chunked step, each first taken as a dry run (``write=False``),
    which must leave the state as it was and give the same update."""
    state = rule.init_state(grads[0].numel(), like=grads[0], shape=shape)
    updates = []
    for g in grads:
        before = {k: v.clone() for k, v in state.items()}
        dry = cas.chunked_step_(rule, g, state, write=False, chunk=chunk)
        assert sorted(state) == sorted(before)
        for key, value in before.items():
            assert torch.equal(state[key], value), key
        updates.append(cas.chunked_step_(rule, g, state, chunk=chunk))
        assert torch.equal(dry, updates[-1])
    return updates, state


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_the_chunked_step_is_the_forward_bit_for_bit_on_one_chunk(config: str) -> None:
    rule = _rule(**CONFIGS[config]).double()
    grads = _grads(1000, 10, torch.float64)
    _assert_equal_runs(_run_chunked(rule, grads, 1000), _run(rule, grads, False))


@pytest.mark.parametrize("orthogonal", [False, True])
def test_the_chunked_step_matches_the_forward_over_many_chunks(orthogonal: bool) -> None:
    """Chunks of 97 coordinates of a 60 x 50 tensor (with ``orthogonal``, a matrix: Muon's
    direction over the whole matrix first): the forward's steps to float64 rounding (the sums
    added chunk by chunk)."""
    rule = _rule(GENERAL_LSTM_DEFAULTS, orthogonal=orthogonal).double()
    grads = _grads(3000, 10, torch.float64)
    shape = (60, 50) if orthogonal else None
    state = rule.init_state(3000, like=grads[0], shape=shape)
    assert ("matrix" in state) == orthogonal
    ref = []
    for g in grads:
        ref.append(cas._forward_step_(rule, g, state))
    updates, chunked = _run_chunked(rule, grads, 97, shape)
    for u, r in zip(updates, ref):
        torch.testing.assert_close(u, r, rtol=1e-10, atol=1e-12 * float(r.abs().max()))
    for key, value in state.items():
        torch.testing.assert_close(chunked[key], value, rtol=1e-10, atol=1e-12, msg=key)


def test_the_chunked_step_refuses_what_reads_sums_inside_the_forward() -> None:
    rule = _rule(GENERAL_LSTM_DEFAULTS, direction_correction=True).double()
    g = _grads(10, 1, torch.float64)[0]
    state = rule.init_state(10, like=g)
    assert rule.chunked_step_(g, state) is None
    with pytest.raises(ValueError, match="sums over the tensor"):
        cas.chunked_step_(rule, g, state)


def test_without_the_kernels_the_step_is_the_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    rule = _rule()
    grads = _grads(50, 5)
    ref = _run(rule, grads, False)
    monkeypatch.setattr(kernels, "_load_corrected_adam", lambda: None)
    _assert_equal_runs(_run(rule, grads, True), ref)


def test_the_optimizer_steps_in_place_with_one_number_per_tensor_for_the_step_size() -> None:
    """LearnedOptimizer takes the in-place path (the state tensors are updated, not replaced);
    the state costs 156 bytes per float32 parameter (39 numbers: four momenta, two second
    moments, the last direction and 16 + 16 LSTM states) plus three numbers per tensor (160 with
    a fifth momentum, Adam's, when it is none of the LSTM's)."""
    rule = LSTMCorrectedAdamRule()
    p = torch.nn.Parameter(torch.zeros(1000))
    opt = LearnedOptimizer([p], rule)
    p.grad = torch.randn(1000)
    opt.step()
    h = opt.state[p]["h0"]
    p.grad = torch.randn(1000)
    opt.step()
    assert opt.state[p]["h0"] is h
    per_coordinate = sum(
        v.numel() * v.element_size() for k, v in opt.state[p].items() if v.numel() >= 1000
    )
    assert per_coordinate == 156 * 1000
    opt = LearnedOptimizer([p], LSTMCorrectedAdamRule(beta1=0.8))
    p.grad = torch.randn(1000)
    opt.step()
    assert sum(v.numel() * v.element_size() for v in opt.state[p].values()) == 160 * 1000 + 16
    assert {k for k, v in opt.state[p].items() if v.numel() == 1} == {
        "log_step",
        "grad_fast",
        "grad_peak",
        "step",
    }


def test_the_legacy_defaults_take_the_same_path() -> None:
    """A rule with the former defaults (no adaptation or clipping, the additive term, a
    32-unit LSTM) steps in place like the preset, equal to its forward."""
    rule = _rule(GENERAL_LSTM_DEFAULTS)
    grads = _grads(257, 6)
    (fused, _), (ref, _) = _run(rule, grads, True), _run(rule, grads, False)
    for u, r in zip(fused, ref):
        assert torch.equal(u, r)


def test_state_dicts_are_copied_not_shared_by_the_in_place_step() -> None:
    """Loading an optimizer state dict into another optimizer gives it its own tensors only
    through a copy (as with every torch optimizer whose step is in place)."""
    rule = LSTMCorrectedAdamRule()
    a = torch.nn.Parameter(torch.zeros(10))
    opt = LearnedOptimizer([a], rule)
    a.grad = torch.ones(10)
    opt.step()
    b = torch.nn.Parameter(a.detach().clone())
    other = LearnedOptimizer([b], rule)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    b.grad = torch.ones(10)
    a.grad = torch.ones(10)
    opt.step()
    other.step()
    assert torch.equal(a, b)
