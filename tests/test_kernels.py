"""The fused CPU LSTM-cell kernels agree with the pure-PyTorch path."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from learned_opt import GeneralLSTMRule, LSTMRule, UpdateRule, kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="fused kernels unavailable")


def _reference(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    i, f, g, o = gates.split(gates.shape[1] // 4, dim=1)
    c2 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c2), c2


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
def test_fused_cell_forward_backward_match_reference(dtype: torch.dtype, tol: float) -> None:
    torch.manual_seed(0)
    gates = (torch.randn(300, 80, dtype=dtype) * 4).requires_grad_(True)
    c = torch.randn(300, 20, dtype=dtype, requires_grad=True)
    h1, c1 = _reference(gates, c)
    h2, c2 = kernels.fused_cell(gates, c)
    torch.testing.assert_close(h2, h1, atol=tol, rtol=0)
    torch.testing.assert_close(c2, c1, atol=tol, rtol=0)
    dh, dc = torch.randn_like(h1), torch.randn_like(c1)
    g1 = torch.autograd.grad((h1 * dh).sum() + (c1 * dc).sum(), (gates, c))
    g2 = torch.autograd.grad((h2 * dh).sum() + (c2 * dc).sum(), (gates, c))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, atol=tol * 10, rtol=0)


def test_fused_cell_gradcheck() -> None:
    gates = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(kernels.fused_cell, (gates, c))


def test_in_place_cell_matches() -> None:
    gates, c = torch.randn(50, 80) * 3, torch.randn(50, 20)
    h_ref, c_ref = _reference(gates, c)
    h = torch.empty_like(c)
    assert kernels.fused_cell_(gates, c, h)
    torch.testing.assert_close(h, h_ref, atol=2e-6, rtol=0)
    torch.testing.assert_close(c, c_ref, atol=2e-6, rtol=0)


def test_rule_with_and_without_kernels(monkeypatch: pytest.MonkeyPatch, rule: LSTMRule) -> None:
    grad = torch.randn(500) * 10.0 ** torch.randint(-8, 3, (500,))
    state = rule.init_state(500, like=grad)
    fast, _ = rule(grad, state)
    fast_inplace = rule.step_(grad, rule.init_state(500, like=grad))
    monkeypatch.setattr(kernels, "_EXT", None)  # the pure-PyTorch fallback
    slow, _ = rule(grad, state)
    slow_inplace = rule.step_(grad, rule.init_state(500, like=grad))
    for other in (fast_inplace, slow, slow_inplace):
        torch.testing.assert_close(other, fast, atol=1e-6, rtol=1e-5)


# --- the fused in-place step (kernels.fused_step_, used by LSTMRule.step_) ---------------------


def _random_state(rule: UpdateRule, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = rule.init_state(n, like=torch.zeros(1))
    for layer in range(rule.num_layers):
        for kind in ("h", "c"):
            state[f"{kind}{layer}"] = torch.randn(n, rule.hidden_size, generator=g)
    return state


def _fused(rule: LSTMRule, grad: torch.Tensor, state: dict, block: int | None = None):
    layers = range(rule.num_layers)
    return kernels.fused_step_(
        grad,
        [state[f"h{layer}"] for layer in layers],
        [state[f"c{layer}"] for layer in layers],
        [getattr(rule, f"weight_ih_l{layer}").detach() for layer in layers],
        [getattr(rule, f"weight_hh_l{layer}").detach() for layer in layers],
        [getattr(rule, f"bias_l{layer}").detach() for layer in layers],
        rule.out_weight.detach(),
        rule.out_bias.detach(),
        preprocess_p=rule.preprocess_p if rule.preprocess == "log_sign" else None,
        output_scale=rule.output_scale,
        block=block,
    )


@pytest.mark.parametrize(
    "hidden,layers,preprocess,p,n",
    [
        (20, 2, "log_sign", 10.0, 4099),  # the paper's rule; blocks and a partial last block
        (20, 2, "log_sign", 10.0, 1),
        (20, 2, "log_sign", 10.0, 7),  # fewer rows than one register block, and one more
        (20, 2, "log_sign", 88.0, 500),  # threshold e^-p is a float32 subnormal
        (8, 1, "none", 10.0, 50),
        (12, 3, "log_sign", 5.0, 301),
        (4, 2, "log_sign", 10.0, 13),
        (68, 1, "log_sign", 10.0, 40),  # wider than the on-stack row buffer
    ],
)
def test_fused_step_matches_forward(
    hidden: int, layers: int, preprocess: str, p: float, n: int
) -> None:
    torch.manual_seed(0)
    rule = LSTMRule(hidden, layers, preprocess=preprocess, preprocess_p=p)
    with torch.no_grad():
        rule.out_weight.mul_(5.0)
        for name, param in rule.named_parameters():
            if name.startswith("bias"):
                param.add_(torch.randn_like(param))  # saturating and non-saturating gates
    grad = torch.randn(n) * 10.0 ** torch.randint(-8, 3, (n,)).float()
    grad[: min(n, 3)] = 0.0
    grad[3:7] = torch.tensor([1e-40, -3e-44, 1e-38, -8e-39])[: max(0, min(n, 7) - 3)]  # subnormals
    state = _random_state(rule, n)
    with torch.no_grad(), pytest.MonkeyPatch.context() as m:
        m.setattr(kernels, "_load", lambda: None)  # the pure-PyTorch forward as the reference
        expected, new_state = rule(grad, state)
    with torch.no_grad():
        fused_state = {k: v.clone() for k, v in state.items()}
        update = _fused(rule, grad, fused_state)
    assert update is not None
    torch.testing.assert_close(update, expected, atol=1e-6, rtol=1e-5)
    for layer in range(layers):
        for kind in ("h", "c"):
            key = f"{kind}{layer}"
            torch.testing.assert_close(fused_state[key], new_state[key], atol=2e-6, rtol=1e-5)


def test_fused_step_does_not_depend_on_blocks_or_threads(rule: LSTMRule) -> None:
    n = 10_007
    grad = torch.randn(n) * 1e-3
    results = []
    threads = torch.get_num_threads()
    try:
        for num_threads, block in ((1, None), (2, None), (2, 6), (3, 7), (1, 100_000)):
            torch.set_num_threads(num_threads)
            state = _random_state(rule, n)
            update = _fused(rule, grad, state, block=block)
            results.append((update, state))
    finally:
        torch.set_num_threads(threads)
    update0, state0 = results[0]
    for update, state in results[1:]:
        assert torch.equal(update, update0)
        for key in ("h0", "c0", "h1", "c1"):
            assert torch.equal(state[key], state0[key])


def test_fused_step_bf16_state_is_the_fp32_step_of_the_rounded_state(rule: LSTMRule) -> None:
    n = 1000
    grad = torch.randn(n) * 1e-2
    state32 = {
        k: (v.to(torch.bfloat16).float() if v.dim() == 2 else v)
        for k, v in _random_state(rule, n).items()
    }
    state16 = {k: (v.to(torch.bfloat16) if v.dim() == 2 else v.clone()) for k, v in state32.items()}
    expected = _fused(rule, grad, state32)
    got = _fused(rule, grad, state16, block=10)
    assert torch.equal(got, expected)
    for key in ("h0", "c0", "h1", "c1"):
        assert state16[key].dtype == torch.bfloat16
        assert torch.equal(state16[key], state32[key].to(torch.bfloat16))


def test_fused_step_declines_what_it_does_not_cover(rule: LSTMRule) -> None:
    n = 10
    state = _random_state(rule, n)
    assert _fused(rule, torch.randn(n, dtype=torch.float64), state) is None
    assert _fused(rule, torch.randn(2 * n)[::2], state) is None  # non-contiguous gradient
    state["c1"] = torch.randn(rule.hidden_size, n).t()  # non-contiguous state
    assert _fused(rule, torch.randn(n), state) is None
    odd = LSTMRule(6, 1)  # hidden size not a multiple of 4: the chunked path
    assert _fused(odd, torch.randn(n), _random_state(odd, n)) is None
    grad = torch.randn(n)
    state = _random_state(odd, n)
    expected, _ = odd(grad, state)
    torch.testing.assert_close(odd.step_(grad, state), expected, atol=1e-6, rtol=1e-5)


def test_vector_tanh_and_sigmoid_error_bounds() -> None:
    """The fused step's rational tanh, and sigmoid(x) = 0.5 tanh(x / 2) + 0.5 built from it, are
    within 5e-7 (absolute) of the exact functions over the whole float range: the rational
    function's own 3.2e-7 plus what the refined reciprocal estimate leaves, which differs by CPU
    vendor (up to about 4.3e-7 within the instruction's documented error)."""
    x = torch.cat((torch.linspace(-20.0, 20.0, 2_000_001), torch.tensor([-1e30, 1e30, 0.0])))
    t = kernels._load().tanh_approx(x)
    assert (t.double() - torch.tanh(x.double())).abs().max() < 5e-7
    s = 0.5 * kernels._load().tanh_approx(0.5 * x) + 0.5
    assert (s.double() - torch.sigmoid(x.double())).abs().max() < 5e-7
    assert t.abs().max() <= 1.0 and s.min() >= 0.0 and s.max() <= 1.0


def test_build_name_includes_the_cpu() -> None:
    fp = kernels._cpu_fingerprint()
    assert fp == kernels._cpu_fingerprint()
    assert len(fp) == 10 and all(ch in "0123456789abcdef" for ch in fp)


@pytest.mark.parametrize("extension", ["learned_opt_lstm_cell", "learned_opt_corrected_adam"])
def test_a_build_lock_left_by_a_killed_process_does_not_block_loading(extension: str) -> None:
    """PyTorch creates and removes a lock file around every load, up-to-date builds included: a
    process killed in between (the fault tests kill meta-training at random moments) leaves it
    behind, and PyTorch alone would make every later load wait on it forever."""
    lock = kernels._build_directory(extension) / "lock"
    lock.touch()  # what the killed process leaves, an hour old
    stale = time.time() - 3600
    os.utime(lock, (stale, stale))
    code = (
        "from learned_opt import kernels; import sys; "
        "sys.exit(0 if kernels.available() and kernels._load_corrected_adam() else 3)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # gone (a lock there now is another process's, loading the shared build meanwhile)
    assert not lock.exists() or lock.stat().st_mtime != stale


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="built with OpenMP on Linux only")
def test_parallel_for_is_really_parallel() -> None:
    """at::parallel_for is a header template: the extension must itself be built with OpenMP, or
    the fused step silently runs on one thread."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert kernels._load().parallel_width() == 2
    finally:
        torch.set_num_threads(threads)


# --- the fused differentiable step (kernels.fused_rule, used by LSTMRule.forward) -------------


def _meta_grads(rule: UpdateRule, n: int, steps: int, fused: bool) -> tuple[torch.Tensor, list]:
    """A small unroll through ``rule.forward``: the loss reads the updates and some of the states
    (so that the backward gets gradients wrt states and a None for others), differentiated wrt
    the rule's weights."""
    gen = torch.Generator().manual_seed(1)
    state = _random_state(rule, n)
    phi = torch.randn(n, generator=gen)
    loss = torch.zeros(())
    with pytest.MonkeyPatch.context() as m:
        if not fused:
            m.setattr(kernels, "_load", lambda: None)
        for t in range(steps):
            grad = torch.randn(n, generator=gen) * 10.0 ** torch.randint(-8, 2, (n,), generator=gen)
            update, state = rule(grad, state)
            if isinstance(rule, LSTMRule):
                assert (type(update.grad_fn).__name__ == "_FusedRuleBackward") == fused
            else:
                assert (type(state["h0"].grad_fn).__name__ == "_FusedRuleBackward") == fused
            phi = phi + update
            loss = loss + (phi**2).sum() + 0.1 * (state["c0"] ** 2).sum()
            if t == steps - 1:
                loss = loss + (state[f"h{rule.num_layers - 1}"].cos()).sum()
    return loss.detach(), list(torch.autograd.grad(loss, list(rule.parameters())))


@pytest.mark.parametrize(
    "hidden,layers,preprocess,p,n",
    [
        (20, 2, "log_sign", 10.0, 4099),  # the paper's rule; several chunks, a partial block
        (20, 2, "log_sign", 10.0, 1),
        (8, 1, "none", 10.0, 50),
        (12, 3, "log_sign", 5.0, 301),
        (4, 2, "log_sign", 10.0, 13),
        (32, 1, "log_sign", 10.0, 70),
        (68, 1, "log_sign", 10.0, 40),  # wider than the backward's register kernels
    ],
)
def test_fused_rule_meta_gradients_match_pytorch(
    hidden: int, layers: int, preprocess: str, p: float, n: int
) -> None:
    torch.manual_seed(0)
    rule = LSTMRule(hidden, layers, preprocess=preprocess, preprocess_p=p)
    with torch.no_grad():
        for name, param in rule.named_parameters():
            if name.startswith("bias"):
                param.add_(torch.randn_like(param))
    loss, grads = _meta_grads(rule, n, 3, fused=True)
    ref_loss, ref_grads = _meta_grads(rule, n, 3, fused=False)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for (name, _), g, ref in zip(rule.named_parameters(), grads, ref_grads, strict=True):
        scale = ref.abs().max().clamp_min(1e-6)
        assert (g - ref).abs().max() / scale < 1e-4, name


def test_fused_rule_gradients_do_not_depend_on_threads(rule: LSTMRule) -> None:
    threads = torch.get_num_threads()
    results = []
    try:
        for num_threads in (1, 2, 3):
            torch.set_num_threads(num_threads)
            results.append(_meta_grads(rule, 5003, 2, fused=True))
    finally:
        torch.set_num_threads(threads)
    for loss, grads in results[1:]:
        assert torch.equal(loss, results[0][0])
        for g, g0 in zip(grads, results[0][1], strict=True):
            assert torch.equal(g, g0)


def test_fused_rule_covers_first_order_float32_only(rule: LSTMRule) -> None:
    n = 10
    state = _random_state(rule, n)
    layers = range(rule.num_layers)

    def call(grad: torch.Tensor, dtype: torch.dtype = torch.float32):
        r = LSTMRule().to(dtype)
        return kernels.fused_rule(
            grad.to(dtype),
            [state[f"h{layer}"].to(dtype) for layer in layers],
            [state[f"c{layer}"].to(dtype) for layer in layers],
            [getattr(r, f"weight_ih_l{layer}") for layer in layers],
            [getattr(r, f"weight_hh_l{layer}") for layer in layers],
            [getattr(r, f"bias_l{layer}") for layer in layers],
            r.out_weight,
            r.out_bias,
            preprocess_p=10.0,
            output_scale=0.1,
        )

    assert call(torch.randn(n)) is not None
    assert call(torch.randn(n), torch.float64) is None  # float64: the PyTorch path
    assert call(torch.randn(n, requires_grad=True)) is None  # second order: the PyTorch path


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # 1 x 32, scale-invariant inputs, nominal Adam step
        {"nominal": False},
        {"scale_invariant": False, "hidden_size": 8, "num_layers": 2},
    ],
)
def test_general_rule_fused_lstm_matches_pytorch(kwargs: dict) -> None:
    torch.manual_seed(0)
    rule = GeneralLSTMRule(**kwargs)
    rule.reset_parameters(zero_output=False)  # a read-out that depends on the LSTM
    loss, grads = _meta_grads(rule, 777, 3, fused=True)
    ref_loss, ref_grads = _meta_grads(rule, 777, 3, fused=False)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for (name, _), g, ref in zip(rule.named_parameters(), grads, ref_grads, strict=True):
        scale = ref.abs().max().clamp_min(1e-6)
        assert (g - ref).abs().max() / scale < 1e-4, name
    # inference (no graph): the in-place kernel on copies of the states
    state = _random_state(rule, 500)
    grad = torch.randn(500) * 1e-2
    with torch.no_grad():
        update, new = rule(grad, state)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(kernels, "_load", lambda: None)
            ref_update, ref_new = rule(grad, state)
    torch.testing.assert_close(update, ref_update, atol=1e-6, rtol=1e-5)
    for key in ref_new:
        torch.testing.assert_close(new[key], ref_new[key], atol=2e-6, rtol=1e-5)


def test_fused_rule_inference_and_training_forwards_agree_exactly(rule: LSTMRule) -> None:
    state = _random_state(rule, 3001)
    grad = torch.randn(3001) * 1e-3
    update, new = rule(grad, state)  # training forward (saves activations)
    assert update.requires_grad
    with torch.no_grad():
        update2, new2 = rule(grad, state)  # in-place kernel on copies of the states
    assert torch.equal(update.detach(), update2)
    for key in ("h0", "c0", "h1", "c1"):
        assert torch.equal(new[key].detach(), new2[key])
        assert not torch.equal(new2[key], state[key])  # the old states are left as they were


# --- the LSTM-corrected Adam rule's fused step (corrected_adam.cpp) -------------------------


@pytest.mark.parametrize(
    "n,n_in,hidden,layers",
    [
        (1, 7, 16, 1),
        (5, 7, 16, 1),
        (99, 7, 16, 1),
        (20011, 7, 16, 1),
        (777, 7, 32, 2),
        (300, 3, 48, 1),
    ],
)
def test_16_lane_lstm_is_the_8_lane_kernel_bit_for_bit(
    n: int, n_in: int, hidden: int, layers: int
) -> None:
    """corrected_adam.cpp's AVX-512 LSTM layers repeat lstm_cell.cpp's fused layers (as its
    -ffast-math build computes them) operation for operation: the same bits, on large random
    states and weights too."""
    ext = kernels._load_corrected_adam()
    if ext is None:
        pytest.skip("fused kernels unavailable")
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, n_in, generator=g) * 3
    dims = [n_in] + [hidden] * (layers - 1)
    w_ih = [torch.randn(d, 4 * hidden, generator=g) * 0.5 for d in dims]
    w_hh = [torch.randn(hidden, 4 * hidden, generator=g) * 0.5 for _ in dims]
    bias = [torch.randn(4 * hidden, generator=g) for _ in dims]
    h = [torch.randn(n, hidden, generator=g) for _ in dims]
    c = [torch.randn(n, hidden, generator=g) * 5 for _ in dims]
    h16, c16 = [t.clone() for t in h], [t.clone() for t in c]
    empty = torch.empty(0)
    kernels._load().step_(x, h, c, w_ih, w_hh, bias, empty, empty, 0.0, 1.0, 128, True)
    packed, offsets = kernels._load().pack_lstm(w_ih, w_hh, bias)
    if not ext.lstm16_(x, h16, c16, packed, offsets):
        pytest.skip("built without AVX-512")
    for a, b in zip(h + c, h16 + c16):
        assert torch.equal(a, b)


def test_each_install_builds_in_a_folder_of_its_own_and_says_when_it_compiles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Two installs on one machine shared a build folder and rebuilt it on each first use
    after the other; a first build (a minute) now says so; the ninja package's binary is found
    without an activated environment."""
    import ninja
    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", "/usr/bin")
    seen = []
    monkeypatch.setattr(cpp, "load", lambda **kw: seen.append(os.environ["PATH"]) or kw["name"])
    name = kernels._build("learned_opt_lstm_cell", "lstm_cell.cpp", [])
    assert name.endswith(f"_{kernels._cpu_fingerprint()}_{kernels._install_fingerprint()}")
    assert "compiling its fused CPU kernels" in capsys.readouterr().err
    assert seen == [f"{ninja.BIN_DIR}{os.pathsep}/usr/bin"] and os.environ["PATH"] == "/usr/bin"
    (tmp_path / name / f"{name}.so").touch()  # built: loaded without a word
    kernels._build("learned_opt_lstm_cell", "lstm_cell.cpp", [])
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys, "prefix", "/another/environment")
    assert kernels._build_directory("learned_opt_lstm_cell").name != name
