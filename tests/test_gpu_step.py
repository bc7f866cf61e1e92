"""The drop-in optimizer on CUDA tensors: the default rule's Triton step
(:mod:`learned_opt.kernels.corrected_adam_triton`) against the rule's forward, and the optimizer's
contract on the GPU (same steps as on the CPU, finite for every finite gradient, non-finite
gradients skipped with nothing changed, exact resume). The kernel's arithmetic is also checked
without a GPU, in Triton's interpreter, where Triton is installed."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from learned_opt import LSTMOptimizer, pretrained

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

#: Compares the kernel's step (run by Triton's interpreter on CPU tensors) with the forward's,
#: for the shipped default (a fifth momentum, Adam's), the first general rule, a rule with the
#: learned gain and drift, and an additive rule of another hidden size; float32 state (the
#: interpreter rounds to bfloat16 by truncation).
_INTERPRETED = textwrap.dedent(
    """
    import copy, torch
    from learned_opt import LSTMCorrectedAdamRule, load_rule, pretrained
    from learned_opt.kernels import corrected_adam_triton
    from learned_opt.rules import corrected_adam_step

    general, _ = load_rule(pretrained.path("general"))
    default = load_rule(pretrained.path(pretrained.DEFAULT))[0].unwrapped
    assert len(default._state_betas) == 5
    control = general.variant(controller_hidden=8, controller_drift=0.5)
    additive = LSTMCorrectedAdamRule(hidden_size=32, additive=True)
    gen = torch.Generator().manual_seed(0)
    additive.reset_parameters(gen, zero_output=False)
    with torch.no_grad():
        for name, p in control.named_parameters():
            if name.startswith("controller_"):
                p.copy_(torch.randn(p.shape, generator=gen))
    for rule in (default, general, control, additive):
        rule.requires_grad_(False)
        for n in (1, 300, 1000):
            ref = rule.init_state(n, like=torch.zeros(n))
            fused = copy.deepcopy(ref)
            for k in range(8):
                g = torch.randn(n, generator=gen) * 10.0 ** (k - 4)
                g[: n // 7] *= -3.0
                assert corrected_adam_triton.supported(rule, g, fused)
                expected = corrected_adam_step._forward_step_(rule, g, ref)
                got = corrected_adam_step.step_(rule, g, fused)
                scale = expected.abs().max()
                assert (got - expected).abs().max() <= 1e-5 * scale, (n, k)
            for key, value in ref.items():
                if value.is_floating_point() and value.numel():
                    err = (fused[key].float() - value).abs().max()
                    # log_step's error is the step size's relative error; cos_avg is a cosine
                    floor = 1e-6 if key in ("log_step", "cos_avg") else 1e-30
                    assert err <= 1e-5 * value.abs().max() + floor, (key, float(err))
            assert fused["step"].item() == ref["step"].item() == 8
    print("ok")
    """
)


def test_triton_kernel_in_the_interpreter_matches_the_forward() -> None:
    pytest.importorskip("triton")
    _interpret(_INTERPRETED)


#: Matrices of the default rule and of ``general-v6`` (Muon's direction at Adam's root mean
#: square; a learned controller, and the hand-designed adaptation's kernels): the step kernel reads
#: the orthogonalized direction computed on the device in place of Adam's.
_INTERPRETED_MATRICES = textwrap.dedent(
    """
    import copy, torch
    from learned_opt import load_rule, pretrained
    from learned_opt.kernels import corrected_adam_triton
    from learned_opt.rules import corrected_adam_step

    gen = torch.Generator().manual_seed(0)
    for name in (pretrained.DEFAULT, "general-v6"):
        rule = load_rule(pretrained.path(name))[0].unwrapped
        assert rule.settings.orthogonal
        rule.requires_grad_(False)
        for shape in ((7, 3), (40, 30), (1, 5), (6, 2, 3)):
            n = torch.Size(shape).numel()
            ref = rule.init_state(n, like=torch.zeros(n), shape=shape)
            assert "matrix" in ref
            fused = copy.deepcopy(ref)
            for k in range(8):
                g = torch.randn(n, generator=gen) * 10.0 ** (k - 4)
                assert corrected_adam_triton.supported(rule, g, fused)
                expected = corrected_adam_step._forward_step_(rule, g, ref)
                got = corrected_adam_step.step_(rule, g, fused)
                scale = expected.abs().max()
                assert (got - expected).abs().max() <= 1e-5 * scale, (name, shape, k)
            for key, value in ref.items():
                if value.is_floating_point() and value.numel():
                    err = (fused[key].float() - value).abs().max()
                    floor = 1e-6 if key in ("log_step", "cos_avg") else 1e-30
                    assert err <= 1e-5 * value.abs().max() + floor, (name, key, float(err))
    print("ok")
    """
)


def test_triton_kernel_in_the_interpreter_moves_matrices_along_the_orthogonal_direction() -> None:
    pytest.importorskip("triton")
    _interpret(_INTERPRETED_MATRICES)


#: The drop-in optimizer with the default weights (a schedule around the rule; Muon's direction
#: for matrices; told the run's length and not) on CPU tensors through the Triton step, run by the
#: interpreter: no tensor falls back to the forward, and every parameter ends where the CPU's
#: fused step leaves it, to float32 tolerance.
_INTERPRETED_OPTIMIZER = textwrap.dedent(
    """
    import os, torch
    from learned_opt import LSTMOptimizer, pretrained
    from learned_opt.rules import corrected_adam_step

    calls = []
    forward = corrected_adam_step._forward_step_
    corrected_adam_step._forward_step_ = lambda *a: calls.append(1) or forward(*a)
    shapes = [(), (5,), (7, 3), (30, 25), (700,), (4, 3, 2)]

    def run(total_steps):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        opt = LSTMOptimizer(params, total_steps=total_steps)
        for k in range(8):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * 10.0 ** (k % 5 - 3)
            opt.step()
        return params

    for total in (None, 20):
        kernel = run(total)
        assert not calls, "a tensor took the forward"
        os.environ["LEARNED_OPT_NO_TRITON"] = "1"
        cpu = run(total)
        del os.environ["LEARNED_OPT_NO_TRITON"]
        gen = torch.Generator().manual_seed(0)
        start = [torch.randn(s, generator=gen) for s in shapes]
        for a, b, p0 in zip(kernel, cpu, start):
            a, b = a.detach(), b.detach()
            moved = float((b - p0).abs().max())
            assert float((a - b).abs().max()) <= 1e-4 * moved + 1e-7
    print("ok")
    """
)


def test_the_default_optimizer_takes_the_triton_step_in_the_interpreter() -> None:
    pytest.importorskip("triton")
    _interpret(_INTERPRETED_OPTIMIZER)


#: The per-tensor kernels (the sums over more than one pass of partial sums, then the clipping's
#: and the adaptation's arithmetic) against the forward's per-tensor code, for the default.
_INTERPRETED_PER_TENSOR = textwrap.dedent(
    """
    import torch
    from learned_opt import load_rule, pretrained
    from learned_opt.kernels import corrected_adam_triton
    from learned_opt.rules import per_tensor
    from learned_opt.rules.base import grad_bound

    # the kernels' hand-designed adaptation (the default's learned one runs as PyTorch ops)
    rule = load_rule(pretrained.path("general-v6"))[0].unwrapped
    cfg = rule.settings
    assert rule.controller() is None and cfg.lr_adapt > 0 and cfg.lr_adapt_slowdown > 0
    gen = torch.Generator().manual_seed(0)
    n = 1_200_000  # more partial sums than the arithmetic kernel reads in one pass
    bound = grad_bound(torch.float32)
    clipped = 0
    # v_scale < 1: a gradient larger than its second moment expects, which the clipping scales
    cases = ((1.0, 1.0, 1.0), (2.0, 1e3, 1e-6), (7.0, 1e-3, 1.0), (50.0, 1e2, 1e-3))
    for t, scale, v_scale in cases:
        g = torch.randn(n, generator=gen) * scale
        state = {
            "v": torch.rand(n, generator=gen) * scale**2 * v_scale * (t > 1),
            "prev": torch.randn(n, generator=gen) * 1e-3 * (t > 1),
            "log_step": torch.randn(1, generator=gen),
            "grad_fast": torch.rand(1, generator=gen) * n * scale**2,
            "grad_peak": torch.rand(1, generator=gen) * scale * 1e3,
        }
        limit, rate = per_tensor.clip_limit(cfg, t), per_tensor.adapt_rate(cfg, t)
        clip, exp_s, new = corrected_adam_triton.per_tensor_(rule, g, state, t, bound, limit, rate)
        want_clip = torch.ones(1)
        if t > 1:
            ref = state["v"].sum() / (1 - cfg.beta2 ** (t - 1))
            want_clip = per_tensor.clip_scale(cfg, torch.dot(g, g)[None], ref[None], t)
        gc = g * want_clip
        sums = (-torch.dot(gc, state["prev"])[None], torch.dot(gc, gc)[None],
                torch.dot(state["prev"], state["prev"])[None])
        want = {}
        log_step = per_tensor.adapt_from_sums(cfg, *sums, state, want, t)
        assert torch.allclose(clip, want_clip, rtol=1e-5, atol=0), (t, clip, want_clip)
        clipped += bool(want_clip < 0.99)
        assert torch.allclose(exp_s, torch.exp(log_step), rtol=1e-5, atol=0), t
        assert set(new) == set(want), (set(new), set(want))
        for key, value in want.items():
            assert torch.allclose(new[key], value, rtol=1e-5, atol=1e-6), (t, key)
    assert clipped == 2, clipped
    print("ok")
    """
)


def _interpret(script: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("LEARNED_OPT_NO_TRITON", None)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_per_tensor_kernels_in_the_interpreter_match_the_forward() -> None:
    pytest.importorskip("triton")
    _interpret(_INTERPRETED_PER_TENSOR)


def _params(device: str, shapes, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]


SHAPES = [(), (5,), (7, 3), (300, 257), (70_000,)]


def _run(device: str, weights: str, state_dtype, steps: int = 12, **kw) -> list[torch.Tensor]:
    params = _params(device, SHAPES)
    opt = LSTMOptimizer(params, weights=weights, state_dtype=state_dtype, **kw)
    gen = torch.Generator().manual_seed(1)
    for k in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 10.0 ** (k % 5 - 3)).to(device)
        opt.step()
    return [p.detach().cpu() for p in params]


@needs_cuda
@pytest.mark.parametrize("weights", pretrained.available())
@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_cuda_steps_match_cpu_steps(weights, state_dtype) -> None:
    kw = {"weight_decay": 1e-3, "maximize": True}
    cpu = _run("cpu", weights, state_dtype, **kw)
    gpu = _run("cuda", weights, state_dtype, **kw)
    init = _params("cpu", SHAPES)
    tol = 1e-4 if state_dtype is None else 2e-2  # bfloat16 state: a rounding apart can grow
    for a, b, p0 in zip(cpu, gpu, init):
        moved = float((a - p0.detach()).abs().max())  # relative to how far the steps went
        assert (a - b).abs().max() <= tol * moved + 1e-7


@needs_cuda
def test_cuda_step_takes_the_kernel_and_agrees_with_the_forward(monkeypatch) -> None:
    from learned_opt.kernels import corrected_adam_triton

    pytest.importorskip("triton")
    kernel = _run("cuda", "general", None)
    monkeypatch.setenv("LEARNED_OPT_NO_TRITON", "1")
    assert not corrected_adam_triton.available()
    forward = _run("cuda", "general", None)
    for a, b in zip(kernel, forward):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    monkeypatch.delenv("LEARNED_OPT_NO_TRITON")
    params = _params("cuda", [(1000,)])
    opt = LSTMOptimizer(params)
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert opt.state[params[0]]["step"].device.type == "cpu"  # the kernel's path keeps it there


@needs_cuda
def test_cuda_default_steps_matrices_in_the_kernel(monkeypatch) -> None:
    """The default weights' matrices (Muon's direction) take the Triton step, not the forward,
    and agree with the forward."""
    from learned_opt.kernels import corrected_adam_triton
    from learned_opt.rules import corrected_adam_step

    pytest.importorskip("triton")
    calls = []
    forward = corrected_adam_step._forward_step_
    monkeypatch.setattr(
        corrected_adam_step, "_forward_step_", lambda *a: calls.append(1) or forward(*a)
    )
    kernel = _run("cuda", pretrained.DEFAULT, None)
    assert not calls
    monkeypatch.setenv("LEARNED_OPT_NO_TRITON", "1")
    assert not corrected_adam_triton.available()
    reference = _run("cuda", pretrained.DEFAULT, None)
    assert calls
    for a, b, p0 in zip(kernel, reference, _params("cpu", SHAPES)):
        moved = float((b - p0.detach()).abs().max())
        assert (a - b).abs().max() <= 1e-4 * moved + 1e-7


@needs_cuda
@pytest.mark.parametrize("magnitude", [1e-38, 1e20, 1e30, 3e38])
def test_cuda_finite_for_every_finite_gradient(magnitude) -> None:
    params = _params("cuda", SHAPES)
    for state_dtype in (None, torch.bfloat16):
        opt = LSTMOptimizer(params, state_dtype=state_dtype)
        for k in range(5):
            for p in params:
                p.grad = torch.full_like(p, magnitude * (-1) ** k)
            opt.step()
        assert all(torch.isfinite(p).all() for p in params)
        for state in opt.state.values():
            assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@needs_cuda
def test_cuda_nonfinite_gradient_changes_nothing() -> None:
    params = _params("cuda", [(100,)])
    opt = LSTMOptimizer(params)
    params[0].grad = torch.randn_like(params[0])
    opt.step()
    before = params[0].detach().clone()
    state = copy.deepcopy(opt.state[params[0]])
    params[0].grad[3] = float("nan")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        opt.step()
    assert torch.equal(params[0], before)
    for key, value in state.items():
        assert torch.equal(opt.state[params[0]][key], value)


@needs_cuda
def test_cuda_resume_from_state_dict_is_exact() -> None:
    gen = torch.Generator().manual_seed(3)
    grads = [[torch.randn(s, generator=gen).cuda() for s in SHAPES] for _ in range(6)]

    def steps(opt, params, gs):
        for g in gs:
            for p, gp in zip(params, g):
                p.grad = gp.clone()
            opt.step()

    params = _params("cuda", SHAPES)
    opt = LSTMOptimizer(params)
    steps(opt, params, grads)
    params2 = _params("cuda", SHAPES)
    opt2 = LSTMOptimizer(params2)
    steps(opt2, params2, grads[:3])
    saved = copy.deepcopy(opt2.state_dict())
    opt3 = LSTMOptimizer(params2)
    opt3.load_state_dict(saved)
    steps(opt3, params2, grads[3:])
    for a, b in zip(params, params2):
        assert torch.equal(a, b)


def test_a_kernel_that_fails_to_compile_falls_back_to_the_forward(monkeypatch) -> None:
    """A Triton kernel that fails to compile or launch (an unsupported GPU, another Triton
    version) warns once and leaves the step to the forward, with the same results."""
    ct = pytest.importorskip("learned_opt.kernels.corrected_adam_triton")

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler for this GPU")

    expected = _run("cpu", "general", None, steps=3)
    monkeypatch.setattr(ct, "_FAILED", None)
    monkeypatch.setattr(ct, "_launch", broken)
    monkeypatch.setattr(ct, "_on_device", lambda t: True)  # as if the CPU tensors were a GPU's
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.warns(RuntimeWarning, match="Triton step .* unavailable"):
        got = _run("cpu", "general", None, steps=3)
    assert not ct.available()
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@needs_cuda
@pytest.mark.parametrize(
    "rule_name", ["general", "general with a controller", "default", "default without its LSTM"]
)
def test_cuda_step_waits_for_the_device_twice_however_many_tensors(rule_name) -> None:
    """A step of the first general rule (of one with the learned gain and drift; of the
    default, whose matrices move along Muon's direction; of the default without its LSTM, whose
    step is the rule's forward) synchronizes with the GPU twice (the
    gradients' and the updates' finiteness, each read for all tensors at once), not once or
    more per tensor."""
    from learned_opt import load_rule

    name = pretrained.DEFAULT if rule_name.startswith("default") else "general"
    rule, _ = load_rule(pretrained.path(name))
    if rule_name == "general with a controller":
        rule = rule.variant(controller_hidden=8, controller_drift=0.5)
    if rule_name == "default without its LSTM":  # (the rule's forward, on the device)
        rule.base = rule.base.variant(lstm=False)
    params = _params("cuda", SHAPES * 4)
    opt = LSTMOptimizer(params, weights=rule)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # the first step creates the state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 2, [str(w.message) for w in syncs]
