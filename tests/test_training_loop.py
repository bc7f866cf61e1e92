"""``LSTMOptimizer`` inside an ordinary PyTorch training loop, with its usual companions.

Each test is also a recipe; all of them run the shipped default weights unless said otherwise.

Mixed precision (``torch.amp``)::

    scaler = torch.amp.GradScaler("cpu")        # "cuda" on a GPU
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(model(x), y)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)                         # only if the gradients are clipped next
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(opt)                             # skips opt.step() if a gradient overflowed
    scaler.update()

Compiled models: ``torch.compile(model)`` shares its parameters with ``model``; pass either's
``parameters()`` to the optimizer. Param groups may each set ``lr`` (a multiplier on the learned
update), ``weight_decay`` (decoupled: each step multiplies the weights by ``1 - lr *
weight_decay``) and ``maximize``. ``torch.optim.lr_scheduler`` schedules ``lr`` (and so the decay).
A run resumes exactly from ``opt.state_dict()`` and ``model.state_dict()`` saved with
``torch.save`` and read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from learned_opt import LearnedOptimizer, LSTMOptimizer, SGDRule

# --- helpers


def _model(seed: int = 0) -> nn.Module:
    """A small regression net with matrices, biases and a LayerNorm (several tensor shapes)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 32),
        nn.LayerNorm(32),
        nn.Tanh(),
        nn.Linear(32, 16),
        nn.Tanh(),
        nn.Linear(16, 1),
    )


def _batch(step: int) -> tuple[Tensor, Tensor]:
    """The minibatch of a step: the same on every call, whatever happened before."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 8, generator=g)
    y = (x[:, :3].sum(dim=1, keepdim=True)).sin() + 0.1 * torch.randn(16, 1, generator=g)
    return x, y


def _loss(model: nn.Module, step: int) -> Tensor:
    x, y = _batch(step)
    return nn.functional.mse_loss(model(x), y)


def _train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: range,
    sched: torch.optim.lr_scheduler.LRScheduler | None = None,
    loss_fn: Callable[[nn.Module, int], Tensor] = _loss,
) -> list[float]:
    losses = []
    for k in steps:
        opt.zero_grad()
        loss = loss_fn(model, k)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def _snapshot_state(opt: torch.optim.Optimizer) -> list[dict[str, object]]:
    return [
        {k: v.clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in s.items()}
        for s in opt.state.values()
    ]


def _same_state(a: list[dict[str, object]], b: list[dict[str, object]]) -> bool:
    if len(a) != len(b):
        return False
    for sa, sb in zip(a, b):
        if sa.keys() != sb.keys():
            return False
        for k in sa:
            va, vb = sa[k], sb[k]
            if isinstance(va, Tensor):
                if not (isinstance(vb, Tensor) and va.dtype == vb.dtype and torch.equal(va, vb)):
                    return False
            elif va != vb:
                return False
    return True


def _assert_params_equal(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


def _zero_update_optimizer(params, **kwargs) -> LearnedOptimizer:
    """An optimizer whose rule's update is exactly zero: only weight decay moves the weights."""
    return LearnedOptimizer(params, SGDRule(lr=0.0), **kwargs)


def _fp16_autocast_on_cpu() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            out = nn.Linear(2, 2)(torch.ones(1, 2))
        return out.dtype == torch.float16
    except (RuntimeError, ValueError):
        return False


_AMP_DTYPES = [torch.bfloat16] + ([torch.float16] if _fp16_autocast_on_cpu() else [])


def _amp_loss(model: nn.Module, step: int, dtype: torch.dtype) -> Tensor:
    x, y = _batch(step)
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
    return nn.functional.mse_loss(out.float(), y)


# --- torch.amp


@pytest.mark.parametrize("dtype", _AMP_DTYPES)
def test_grad_scaler_step_that_overflows_leaves_parameters_and_state_untouched(
    dtype: torch.dtype,
) -> None:
    model = _model()
    opt = LSTMOptimizer(model.parameters())
    scaler = torch.amp.GradScaler("cpu")
    for k in range(3):  # ordinary steps: the scaler does not back off
        opt.zero_grad()
        scaler.scale(_amp_loss(model, k, dtype)).backward()
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() == 2.0**16

    params = [p.detach().clone() for p in model.parameters()]
    state = _snapshot_state(opt)
    calls = []
    inner_step = opt.step
    opt.step = lambda *a, **kw: (calls.append(1), inner_step(*a, **kw))[1]
    # A batch with an outlier target: its scaled gradients overflow float16 at the usual scale;
    # bfloat16 (float32's range) needs a scale near float32's maximum to overflow.
    scale = 2.0**16 if dtype == torch.float16 else 2.0**120
    scaler.update(new_scale=scale)
    x, y = _batch(3)
    y[0] = 1e4
    opt.zero_grad()
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
    scaler.scale(nn.functional.mse_loss(out.float(), y)).backward()
    assert not all(torch.isfinite(p.grad).all() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the optimizer is never asked: no skip warning either
        scaler.step(opt)
    scaler.update()
    assert calls == []  # GradScaler.step skipped opt.step() ...
    assert scaler.get_scale() == scale / 2  # ... and backed off
    for p, before in zip(model.parameters(), params):
        assert torch.equal(p, before)
    assert _same_state(_snapshot_state(opt), state)

    # Training continues normally at the reduced scale.
    opt.zero_grad()
    scaler.update(new_scale=2.0**16)
    scaler.scale(_amp_loss(model, 4, dtype)).backward()
    scaler.step(opt)
    scaler.update()
    assert calls == [1]
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), params))
    assert not _same_state(_snapshot_state(opt), state)


@pytest.mark.parametrize("dtype", _AMP_DTYPES)
def test_grad_scaler_step_without_overflow_is_the_unscaled_step(dtype: torch.dtype) -> None:
    scaled, plain = _model(), _model()
    opt_s, opt_p = LSTMOptimizer(scaled.parameters()), LSTMOptimizer(plain.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    for k in range(5):
        for opt in (opt_s, opt_p):
            opt.zero_grad()
        scaler.scale(_amp_loss(scaled, k, dtype)).backward()
        scaler.step(opt_s)
        scaler.update()
        _amp_loss(plain, k, dtype).backward()
        opt_p.step()
    assert scaler.get_scale() == 2.0**12  # grew twice: no step was found to overflow
    assert all(float(s["step"]) == 5 for s in opt_s.state.values())
    if dtype == torch.bfloat16:
        # bfloat16 has float32's exponent range: a power-of-two scale is undone exactly.
        _assert_params_equal(scaled, plain)
    else:
        # float16 gradients flush small values to zero without the scale: close, not equal
        # (the default's step size grows fastest in its first steps, which carries the
        # difference a little further).
        for a, b in zip(scaled.parameters(), plain.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-2, atol=3e-3)
    assert not all(torch.equal(a, b) for a, b in zip(scaled.parameters(), _model().parameters()))


def test_grad_scaler_with_unscale_and_clipping() -> None:
    """The documented AMP recipe with clipping: unscale_, clip, scaler.step, update."""
    model, ref = _model(), _model()
    opt, opt_ref = LSTMOptimizer(model.parameters()), LSTMOptimizer(ref.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    max_norm = 0.05
    for k in range(4):
        opt.zero_grad()
        scaler.scale(_amp_loss(model, k, torch.bfloat16)).backward()
        scaler.unscale_(opt)
        norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        assert norm > max_norm  # the clip is active
        scaler.step(opt)  # does not unscale twice
        scaler.update()

        opt_ref.zero_grad()
        _amp_loss(ref, k, torch.bfloat16).backward()
        nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        opt_ref.step()
    _assert_params_equal(model, ref)


# --- gradient clipping


def test_clip_grad_norm_before_step_is_the_step_on_the_clipped_gradient() -> None:
    clipped, manual = _model(), _model()
    opt_c, opt_m = LSTMOptimizer(clipped.parameters()), LSTMOptimizer(manual.parameters())
    max_norm = 0.1
    for k in range(6):
        opt_c.zero_grad()
        _loss(clipped, k).backward()
        total = nn.utils.clip_grad_norm_(clipped.parameters(), max_norm)
        assert total > max_norm
        after = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in clipped.parameters()])
        )
        assert after <= max_norm * (1 + 1e-5)
        opt_c.step()

        opt_m.zero_grad()
        _loss(manual, k).backward()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in manual.parameters():
            p.grad.mul_(coef)  # what clip_grad_norm_ does
        opt_m.step()
    _assert_params_equal(clipped, manual)


# --- torch.compile


def test_compiled_model_trains_like_the_eager_model() -> None:
    # aot_eager traces forward and backward as torch.compile does, but runs eager kernels: the
    # inductor backend spends about 40 s compiling C++ for this net on a 2-core CPU (measured),
    # which the tests cannot afford; what the optimizer sees (parameters shared with the original
    # module, gradients from a compiled backward) is the same with either backend.
    torch._dynamo.reset()
    eager, base = _model(), _model()
    compiled = torch.compile(base, backend="aot_eager")
    opt_e, opt_c = LSTMOptimizer(eager.parameters()), LSTMOptimizer(compiled.parameters())
    assert {id(p) for p in compiled.parameters()} == {id(p) for p in base.parameters()}
    losses_e = _train(eager, opt_e, range(8))
    losses_c = _train(compiled, opt_c, range(8))
    assert min(losses_c[1:]) < losses_c[0]
    for a, b in zip(base.parameters(), eager.parameters()):  # the original module was trained
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert losses_c == pytest.approx(losses_e, rel=1e-4)
    assert not all(torch.equal(a, b) for a, b in zip(base.parameters(), _model().parameters()))


# --- param groups, weight decay, maximize


def _assert_one_optimizer_is_several(
    grouped: nn.Module,
    opt: torch.optim.Optimizer,
    split: nn.Module,
    opts: list[torch.optim.Optimizer],
    loss_fn: Callable[[nn.Module, int], Tensor] = _loss,
) -> None:
    """Six steps of ``opt`` on ``grouped`` and of every one of ``opts`` on ``split`` (the same
    model) end at the same parameters, bit for bit."""
    for k in range(6):
        opt.zero_grad()
        loss_fn(grouped, k).backward()
        opt.step()
        for o in opts:
            o.zero_grad()
        loss_fn(split, k).backward()
        for o in opts:
            o.step()
    _assert_params_equal(grouped, split)


def test_param_groups_each_with_their_own_lr_weight_decay_and_maximize() -> None:
    """One optimizer with three groups is three optimizers, one per group, bit for bit."""
    settings = [
        {"lr": 1.0, "weight_decay": 0.0, "maximize": False},
        {"lr": 0.5, "weight_decay": 1e-2, "maximize": False},
        {"lr": 0.25, "weight_decay": 1e-3, "maximize": True},
    ]

    def loss_fn(model: nn.Module, step: int) -> Tensor:
        # The third group's weights (the last layer) ascend what the others descend.
        x, y = _batch(step)
        last = model[5]
        hidden = model[:5](x)
        return nn.functional.mse_loss(model(x), y) - 0.01 * (last(hidden) ** 2).mean()

    def groups(model: nn.Module) -> list[list[nn.Parameter]]:
        first = list(model[0].parameters()) + list(model[1].parameters())
        return [first, list(model[3].parameters()), list(model[5].parameters())]

    grouped, split = _model(), _model()
    opt = LSTMOptimizer([{"params": ps, **s} for ps, s in zip(groups(grouped), settings)])
    opts = [LSTMOptimizer(ps, **s) for ps, s in zip(groups(split), settings)]
    _assert_one_optimizer_is_several(grouped, opt, split, opts, loss_fn)
    # The groups' settings matter: after one step with the first group's settings everywhere,
    # the first group's weights are the same and the others' differ.
    same, first = _model(), _model()
    _train(same, LSTMOptimizer(same.parameters()), range(1), loss_fn=loss_fn)
    opt = LSTMOptimizer([{"params": ps, **s} for ps, s in zip(groups(first), settings)])
    _train(first, opt, range(1), loss_fn=loss_fn)
    assert torch.equal(same[0].weight, first[0].weight)
    assert not torch.equal(same[3].weight, first[3].weight)
    assert not torch.equal(same[5].weight, first[5].weight)


def test_a_group_with_orthogonal_off_moves_its_matrices_as_the_rule_without_muon() -> None:
    """``orthogonal=False`` on a group (the usual Muon recipe's embeddings and output layer):
    its matrices step bit for bit as under the default rule configured without Muon's direction;
    the other groups' as under the default; the option survives a state dict, and one saved
    before the option existed loads as on."""
    from learned_opt import load_rule, pretrained

    default, _ = load_rule(pretrained.path(pretrained.DEFAULT))
    assert default.reads_shape  # the default moves matrices along Muon's direction
    adam_direction = copy.deepcopy(default)
    adam_direction.base = default.base.variant(orthogonal=False, orthogonal_rms=False)

    grouped, split, plain = _model(), _model(), _model()
    first = [*grouped[0].parameters(), *grouped[5].parameters()]
    rest = [p for i in (1, 3) for p in grouped[i].parameters()]
    opt = LSTMOptimizer([{"params": first, "orthogonal": False}, {"params": rest}])
    opts = [
        LSTMOptimizer([*split[0].parameters(), *split[5].parameters()], weights=adam_direction),
        LSTMOptimizer([p for i in (1, 3) for p in split[i].parameters()]),
    ]
    _assert_one_optimizer_is_several(grouped, opt, split, opts)
    # One step from the same start: the option changes its group's matrices, and only those.
    one = _model()
    groups = [
        [*one[0].parameters(), *one[5].parameters()],
        [*one[1].parameters(), *one[3].parameters()],
    ]
    _train(
        one,
        LSTMOptimizer([{"params": groups[0], "orthogonal": False}, {"params": groups[1]}]),
        range(1),
    )
    _train(plain, LSTMOptimizer(plain.parameters()), range(1))
    assert not torch.equal(plain[0].weight, one[0].weight)
    assert torch.equal(plain[0].bias, one[0].bias)
    assert torch.equal(plain[3].weight, one[3].weight)

    saved = opt.state_dict()
    assert [g["orthogonal"] for g in saved["param_groups"]] == [False, True]
    for g in saved["param_groups"]:
        del g["orthogonal"]  # as saved before the option existed
    fresh = LSTMOptimizer([{"params": first}, {"params": rest}])
    fresh.load_state_dict(saved)
    assert [g["orthogonal"] for g in fresh.param_groups] == [True, True]
    assert "matrix" not in fresh.state[grouped[0].weight]  # the state keeps the direction
    assert "matrix" in fresh.state[grouped[3].weight]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weight_decay_alone_shrinks_the_weights_by_exactly_1_minus_lr_wd_per_step(
    dtype: torch.dtype,
) -> None:
    lr, wd, k = 0.5, 0.01, 25
    w0 = torch.randn(5, 3, dtype=dtype)
    p = nn.Parameter(w0.clone())
    opt = _zero_update_optimizer([p], lr=lr, weight_decay=wd)
    expected = w0.clone()
    for _ in range(k):
        p.grad = torch.randn_like(p)
        opt.step()
        expected.mul_(1 - lr * wd)
    assert torch.equal(p.detach(), expected)  # the same float operations
    torch.testing.assert_close(p.detach(), w0 * (1 - lr * wd) ** k)  # the closed form


def test_weight_decay_follows_the_lr_schedule_and_each_group() -> None:
    wd = [0.1, 0.02]
    p, q = nn.Parameter(torch.ones(4, dtype=torch.float64)), nn.Parameter(torch.ones(2))
    opt = _zero_update_optimizer(
        [{"params": [p], "weight_decay": wd[0]}, {"params": [q], "weight_decay": wd[1], "lr": 2.0}]
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (k + 1))
    factor = [1.0, 1.0]
    for k in range(10):
        for t in (p, q):
            t.grad = torch.ones_like(t)
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs == [1.0 / (k + 1), 2.0 / (k + 1)]
        opt.step()
        sched.step()
        factor = [f * (1 - lr * w) for f, lr, w in zip(factor, lrs, wd)]
    torch.testing.assert_close(p.detach(), torch.full_like(p, factor[0]), rtol=1e-12, atol=0)
    torch.testing.assert_close(q.detach(), torch.full_like(q, factor[1]))
    assert factor[0] < 0.75 and factor[1] < 0.95  # the decay is not negligible


def test_weight_decay_is_applied_before_the_update() -> None:
    """``p <- p * (1 - lr * wd) + lr * update``, with the update computed from the gradient at
    the undecayed weights (AdamW's order)."""
    lr, wd = 0.3, 0.2
    p = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    g = torch.tensor([0.5, 0.25, -1.0])
    opt = LearnedOptimizer([p], SGDRule(lr=0.1), lr=lr, weight_decay=wd)
    p.grad = g.clone()
    expected = (p.detach() * (1 - lr * wd)).add_(-0.1 * g, alpha=lr)
    opt.step()
    assert torch.equal(p.detach(), expected)


def test_default_weights_with_weight_decay_differ_from_without() -> None:
    a, b = _model(), _model()
    _train(a, LSTMOptimizer(a.parameters()), range(5))
    _train(b, LSTMOptimizer(b.parameters(), weight_decay=0.05), range(5))
    norm = lambda m: sum(p.detach().pow(2).sum() for p in m.parameters())  # noqa: E731
    assert norm(b) < norm(a)


def test_maximize_equals_minimizing_the_negated_loss_bit_for_bit() -> None:
    up, down = _model(), _model()
    opt_up = LSTMOptimizer(up.parameters(), maximize=True, weight_decay=1e-3)
    opt_down = LSTMOptimizer(down.parameters(), weight_decay=1e-3)
    _train(up, opt_up, range(8), loss_fn=lambda m, k: -_loss(m, k))
    _train(down, opt_down, range(8))
    _assert_params_equal(up, down)
    assert _same_state(_snapshot_state(opt_up), _snapshot_state(opt_down))
    # ... and maximizing the loss itself increases it.
    asc = _model()
    losses = _train(asc, LSTMOptimizer(asc.parameters(), maximize=True), range(8))
    assert losses[-1] > losses[0]


# --- exact resume


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16], ids=["default", "bf16-state"])
def test_mid_run_resume_from_state_dict_is_exact(tmp_path, state_dtype) -> None:
    n, m = 7, 6

    def fresh() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        model = _model()
        opt = LSTMOptimizer(model.parameters(), state_dtype=state_dtype, weight_decay=1e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n + m, eta_min=0.1)
        return model, opt, sched

    full_model, full_opt, full_sched = fresh()
    _train(full_model, full_opt, range(n + m), full_sched)

    model, opt, sched = fresh()
    _train(model, opt, range(n), sched)
    path = tmp_path / "ckpt.pt"
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, path
    )
    del model, opt, sched

    saved = torch.load(path, weights_only=True)
    model, opt, sched = fresh()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    if state_dtype is not None:
        h0 = next(iter(opt.state.values()))["h0"]
        assert h0.dtype == state_dtype  # the storage dtype survives the round trip
    _train(model, opt, range(n, n + m), sched)

    _assert_params_equal(model, full_model)
    assert _same_state(_snapshot_state(opt), _snapshot_state(full_opt))
    assert opt.param_groups[0]["lr"] == full_opt.param_groups[0]["lr"]
    # A resume that loses the optimizer state is not exact: the comparison can fail.
    model2, opt2, sched2 = fresh()
    model2.load_state_dict(saved["model"])
    sched2.load_state_dict(saved["sched"])
    _train(model2, opt2, range(n, n + m), sched2)
    assert not all(torch.equal(a, b) for a, b in zip(model2.parameters(), full_model.parameters()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_resume_in_the_same_process_is_exact_and_independent(dtype) -> None:
    """``load_state_dict`` of a live optimizer's ``state_dict`` (no file in between): the
    resumed run equals the uninterrupted one, while the original keeps training beside it
    (their states share no tensor), for half-precision parameters too (whose float32 state
    torch's loader would cast to the parameters' dtype, zeroing small second moments)."""
    n, m = 5, 4
    full = _model().to(dtype)
    _train(full, LSTMOptimizer(full.parameters()), range(n + m), loss_fn=_typed_loss)
    original = _model().to(dtype)
    opt = LSTMOptimizer(original.parameters())
    _train(original, opt, range(n), loss_fn=_typed_loss)
    resumed = copy.deepcopy(original)
    opt2 = LSTMOptimizer(resumed.parameters())
    opt2.load_state_dict(opt.state_dict())
    dtypes = [[v.dtype for v in s.values()] for s in opt.state.values()]
    assert [[v.dtype for v in s.values()] for s in opt2.state.values()] == dtypes
    for k in range(n, n + m):  # both continue, step by step
        _train(original, opt, range(k, k + 1), loss_fn=_typed_loss)
        _train(resumed, opt2, range(k, k + 1), loss_fn=_typed_loss)
    _assert_params_equal(resumed, full)
    _assert_params_equal(original, full)


def _typed_loss(model: nn.Module, step: int) -> Tensor:
    x, y = _batch(step)
    dtype = next(model.parameters()).dtype
    return nn.functional.mse_loss(model(x.to(dtype)).float(), y)


def test_load_state_dict_takes_the_saved_rule_or_changes_nothing() -> None:
    """The saved rule's settings come with its state (``general-v2`` into an optimizer built
    with ``general``: the same tensors, another adaptation), and a state dict that does not fit
    the parameter groups changes neither the rule nor the state."""
    model = _model()
    saved = LSTMOptimizer(model.parameters(), weights="general-v2")
    _train(model, saved, range(2))
    opt = LSTMOptimizer(model.parameters(), weights="general")
    assert opt.rule.config() != saved.rule.config()
    with pytest.warns(UserWarning, match="saved with other weights"):
        opt.load_state_dict(saved.state_dict())
    assert opt.rule.config() == saved.rule.config()

    other = LSTMOptimizer(_model().parameters(), weights="general")
    before = other.rule.config()
    wrong = saved.state_dict()
    wrong["param_groups"] = [{**wrong["param_groups"][0], "params": [0]}]
    with pytest.raises(ValueError):
        other.load_state_dict(wrong)
    assert other.rule.config() == before and len(other.state) == 0


def test_scalar_state_keeps_its_dtype_through_a_round_trip() -> None:
    """A horizon-aware rule's ``total_steps`` (a float32 scalar) loaded for float16 parameters:
    not rounded to float16 (100,000 would become inf)."""
    from learned_opt.rules import AdamRule, ScheduledRule

    p = nn.Parameter(torch.ones(3, dtype=torch.float16))
    rule = ScheduledRule("adam", AdamRule(lr=0.01).config())
    opt = LearnedOptimizer([p], rule, total_steps=100_000)
    p.grad = torch.ones_like(p)
    opt.step()
    q = nn.Parameter(p.detach().clone())
    opt2 = LearnedOptimizer([q], rule)
    opt2.load_state_dict(opt.state_dict())
    assert float(opt2.state[q]["total_steps"]) == 100_000


def test_deepcopy_and_pickle_keep_the_optimizer_settings() -> None:
    import pickle

    model = _model()
    opt = LSTMOptimizer(model.parameters(), nonfinite="raise", state_dtype=torch.bfloat16)
    _train(model, opt, range(2))
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.nonfinite == "raise" and clone.state_dtype is torch.bfloat16
        assert clone.rule.config() == opt.rule.config() and clone.metadata == opt.metadata
        params = [p for g in clone.param_groups for p in g["params"]]
        for p in params:
            p.grad = torch.ones_like(p)
        clone.step()  # runs


# --- lr_scheduler


def test_lr_schedulers_compose_and_scale_the_learned_update() -> None:
    """A warm-up then cosine schedule (SequentialLR) sets the multiplier each step, exactly as
    setting ``group["lr"]`` by hand does."""
    total, warm = 12, 3

    def schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.SequentialLR(
            opt,
            [
                torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=warm),
                torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warm),
            ],
            milestones=[warm],
        )

    scheduled, manual = _model(), _model()
    opt_s = LSTMOptimizer(scheduled.parameters())
    sched = schedule(opt_s)
    opt_m = LSTMOptimizer(manual.parameters())
    lrs = []
    for k in range(total):
        lr = opt_s.param_groups[0]["lr"]
        lrs.append(lr)
        opt_m.param_groups[0]["lr"] = lr
        _train(scheduled, opt_s, range(k, k + 1), sched)
        _train(manual, opt_m, range(k, k + 1))
    _assert_params_equal(scheduled, manual)
    assert lrs[0] == pytest.approx(0.1) and max(lrs) == pytest.approx(1.0)
    assert lrs[-1] < 0.05  # decayed
    # The schedule changes the trajectory: a constant multiplier gives other weights.
    const = _model()
    _train(const, LSTMOptimizer(const.parameters()), range(total))
    assert not torch.equal(const[0].weight, scheduled[0].weight)


def test_reduce_lr_on_plateau_lowers_the_multiplier() -> None:
    model = _model()
    opt = LSTMOptimizer(model.parameters())
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    for _ in range(3):
        sched.step(1.0)  # no improvement after the first
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, range(1))
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# --- the time-to-target benchmark


def test_transformer_step_sizes_reads_every_matrix_multiplier(tmp_path, run_script) -> None:
    import json

    script = "benchmarks/transformer_step_sizes.py"
    assert run_script(script, "--smoke", "--out", str(tmp_path)) == 0
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").open()]
    assert [(r["weights"], r["step"]) for r in records] == [
        ("general-wide", 2), ("general-wide", 4), ("general-v2", 2), ("general-v2", 4)
    ]  # fmt: skip
    for r in records:
        values = sorted(r["multipliers"].values())
        assert r["min"] == values[0] and r["max"] == values[-1] and len(r["largest"]) == 3
        assert r["multipliers"][r["largest"][0]] == r["max"] and 0 < r["min"] <= r["max"]
    # the smoke model's tensors are all below general-wide's reference size: the same steps
    assert records[0]["multipliers"] == records[2]["multipliers"]
    assert records[1]["multipliers"] == records[3]["multipliers"]


def test_time_to_target_benchmark_tells_the_default_the_horizon(tmp_path, run_script) -> None:
    argv = ["--smoke", "--total-steps", "--out", str(tmp_path)]
    assert run_script("benchmarks/time_to_target.py", *argv) == 0
    assert "LSTMOptimizer (default weights, untuned, total_steps=6)" in (
        (tmp_path / "table.md").read_text()
    )


def test_time_to_target_benchmark_tunes_on_other_batches_than_it_reports() -> None:
    """AdamW's learning rate is chosen on validation batches of its own: the held-out losses
    reported for both optimizers are on other batches of the validation split."""
    import argparse
    import runpy

    from conftest import ROOT

    from learned_opt.corpus import load_corpus

    script = runpy.run_path(str(ROOT / "benchmarks/time_to_target.py"))
    args = argparse.Namespace(seed=0, batch=2, context=8, eval_batches=2)
    corpus = load_corpus()
    reported = script["_val_batches"](corpus, args)
    tuning = script["_val_batches"](corpus, args, script["_TUNE_STREAM"])
    assert script["_TUNE_STREAM"] != script["_VAL_STREAM"]
    assert len(reported) == len(tuning) == 2
    for (x, _), (xt, _) in zip(reported, tuning):
        assert x.shape == xt.shape and not torch.equal(x, xt)
    again = script["_val_batches"](corpus, args)  # fixed: the same batches on every call
    assert all(torch.equal(a[0], b[0]) for a, b in zip(reported, again))


def test_time_to_target_benchmark_writes_its_records(tmp_path, run_script) -> None:
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert run_script("benchmarks/time_to_target.py", "--smoke", "--out", str(tmp_path)) == 0
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").open()]
    tuning = [r for r in records if r["role"] == "tuning"]
    adamw, lstm = (r for r in records if r["role"] == "compared")
    assert [r["lr"] for r in tuning] == [1e-3, 1e-2]
    assert all(r["val_streams"] == {"reported": 2, "tuning": 3} for r in records)
    assert adamw["lr"] == min(tuning, key=lambda r: r["final_val_loss"])["lr"]
    assert (adamw["optimizer"], lstm["optimizer"]) == ("adamw", "lstm")
    for r in (adamw, lstm):
        assert r["steps_done"] == 6 and not r["diverged"]
        assert r["target_train_loss_smoothed"] == adamw["final_train_loss_smoothed"]
        assert 0 < r["opt_step_share"] < 1 and r["train_seconds"] > 0
        assert [e[0] for e in r["evals"]] == [3, 6]
    assert adamw["steps_to_target"] is not None and adamw["steps_to_target"] <= 6
    # AdamW: two float32 moments per parameter (and a step count per tensor).
    assert adamw["opt_state_bytes"] / adamw["params"] == pytest.approx(8, abs=0.01)
    assert lstm["opt_state_bytes"] > adamw["opt_state_bytes"]

    curves = [json.loads(line) for line in (tmp_path / "curves.jsonl").open()]
    assert [(c["run"], c["step"]) for c in curves] == [
        (run, k) for run in ("adamw", "lstm") for k in range(1, 7)
    ]
    times = [c["time_s"] for c in curves if c["run"] == "lstm"]
    assert times == sorted(times)
    assert [c["step"] for c in curves if "val_loss" in c] == [3, 6, 3, 6]

    assert (tmp_path / "loss_vs_time.png").read_bytes()[:4] == b"\x89PNG"
    assert (
        "Target: tuned AdamW's final smoothed training loss" in (tmp_path / "table.md").read_text()
    )
    for run in ("adamw", "lstm"):
        events = EventAccumulator(str(tmp_path / "tensorboard" / run))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {"train/loss", "train/loss_smoothed", "val/loss", "time/opt_step_ms"} <= tags
        assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 7))


def test_compact_state_benchmark_measures_bytes_and_ratios(tmp_path, run_script) -> None:
    import json

    assert run_script("benchmarks/compact_state.py", "--smoke", "--out", str(tmp_path)) == 0
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").open()]
    assert [r["mode"] for r in records] == ["fp32", "bf16", "fp32-nudged"] * 2
    by_mode = {m: [r for r in records if r["mode"] == m] for m in ("fp32", "bf16", "fp32-nudged")}
    for fp32, bf16 in zip(by_mode["fp32"], by_mode["bf16"]):
        assert fp32["seed"] == bf16["seed"] and fp32["params"] == bf16["params"]
        # bfloat16 halves every per-coordinate entry but the two slow averages (v and the
        # 0.999 momentum, float32: 8 bytes); a few per-tensor scalars stay float32.
        assert bf16["state_bytes_per_param"] < 0.51 * fp32["state_bytes_per_param"] + 4
        assert bf16["state_bytes_per_param"] <= 84
    # the nudge takes effect: it changes the first loss of every task (the final losses of a
    # 10-step smoke run can round back to the same float32, as on a 2-core AMD EPYC)
    assert all(
        nudged["initial_train_loss"] != fp32["initial_train_loss"]
        for fp32, nudged in zip(by_mode["fp32"], by_mode["fp32-nudged"])
    )
    table = (tmp_path / "table.md").read_text()
    assert "| geometric mean (rated) |" in table and "Rated: 2 of 2 tasks" in table
    (h0,) = [line for line in table.splitlines() if line.startswith("| h0 |")]
    fp32_h0, bf16_h0 = (float(cell.split()[0]) for cell in h0.strip("| ").split(" | ")[1:])
    assert "(bfloat16)" in h0 and bf16_h0 == fp32_h0 / 2
    # a task whose loss falls near zero is not rated (no final loss falls below twice the first)
    strict = tmp_path / "strict"
    argv = ["--smoke", "--min-loss-fraction", "2", "--out", str(strict)]
    assert run_script("benchmarks/compact_state.py", *argv) == 0
    assert "Rated: 0 of 2 tasks" in (strict / "table.md").read_text()
