"""The drop-in optimizer: torch.optim contract, parity with the unroll, bad input."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import learned_opt
from learned_opt import LearnedOptimizer, LSTMOptimizer, NonFiniteGradientError, SGDRule
from learned_opt.learners import OptimizerLearner
from learned_opt.outer import unroll
from learned_opt.tasks import make_family


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))


def _loss(model: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=g)
    return ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()


def test_default_weights_are_shipped_and_train_a_model() -> None:
    model = _model()
    opt = LSTMOptimizer(model.parameters())
    assert opt.metadata.get("command"), "shipped weights must record how they were made"
    first = float(_loss(model).detach())
    for _ in range(50):
        opt.zero_grad()
        _loss(model).backward()
        opt.step()
    assert float(_loss(model).detach()) < first


def test_empty_parameter_list_raises() -> None:
    with pytest.raises(ValueError, match="empty"):
        LSTMOptimizer([])


def test_invalid_arguments_raise(rule) -> None:
    p = [nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="learning rate"):
        LSTMOptimizer(p, weights=rule, lr=-1.0)
    with pytest.raises(ValueError, match="nonfinite"):
        LSTMOptimizer(p, weights=rule, nonfinite="ignore")
    with pytest.raises(ValueError, match="neither a shipped name"):
        LSTMOptimizer(p, weights="no-such-weights")


@pytest.mark.parametrize(
    "options",
    [
        {"lr": float("nan")},
        {"lr": float("inf")},
        {"lr": torch.tensor(-1.0)},
        {"lr": torch.tensor([0.5, 0.5])},
        {"weight_decay": float("nan")},
        {"weight_decay": torch.tensor(-0.5)},
    ],
)
def test_a_non_finite_or_negative_rate_is_refused_as_torch_optim_does(options: dict) -> None:
    """A NaN multiplier would reach every parameter unchecked: refused up front, in a group
    added later too (which is then not added)."""
    with pytest.raises(ValueError, match="Invalid"):
        LSTMOptimizer([nn.Parameter(torch.ones(2))], **options)
    opt = LSTMOptimizer([nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="Invalid"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(3))], **options})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("policy", ["skip", "raise"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_a_rate_set_after_construction_is_checked_at_the_step(policy: str, bad: float) -> None:
    """A scheduler (or the user) setting a NaN, infinite or negative rate later: the step
    refuses it before any parameter or state changes, whatever the non-finite policy."""
    a, b = nn.Parameter(torch.ones(4, 3)), nn.Parameter(torch.ones(5))
    opt = LSTMOptimizer([{"params": [a]}, {"params": [b]}], nonfinite=policy)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: bad if i >= 1 else 1.0)
    for p in (a, b):
        p.grad = torch.ones_like(p)
    opt.step()
    sched.step()
    before = [a.detach().clone(), b.detach().clone()]
    state = {k: v.clone() for k, v in opt.state[a].items()}
    for group, key in ((0, "lr"), (1, "lr"), (1, "weight_decay")):  # the scheduler's, then ours
        if key == "weight_decay" or group == 1:
            for g in opt.param_groups:
                g["lr"], g["weight_decay"] = 1.0, 0.0
            opt.param_groups[group][key] = bad
        with pytest.raises(ValueError, match=rf"Invalid .* in param group {group}; no param"):
            opt.step()
        assert torch.equal(a, before[0]) and torch.equal(b, before[1])
        assert all(torch.equal(v, state[k]) for k, v in opt.state[a].items())


def test_named_parameters_are_checked_as_parameters_are() -> None:
    """``model.named_parameters()``, which torch.optim takes: a complex or integer parameter
    among them is refused as it is without names."""
    complex_model = nn.Linear(3, 2, dtype=torch.cfloat)
    with pytest.raises(TypeError, match="real floating-point parameters"):
        LSTMOptimizer(complex_model.named_parameters())
    with pytest.raises(TypeError, match="real floating-point parameters"):
        LSTMOptimizer([("i", torch.zeros(3, dtype=torch.long))])
    model = nn.Linear(3, 2)
    opt = LSTMOptimizer(model.named_parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert opt.param_groups[0]["param_names"] == ["weight", "bias"]


def test_state_dict_hooks_act_as_torch_optims_do() -> None:
    """A load pre-hook's result is what is loaded (here: every first moment zeroed, then: a
    state dict with no state, which loads as no state); the post-hooks run once, at the end;
    a state-dict post-hook sees the rule's record."""
    model = nn.Linear(4, 3)
    opt = LSTMOptimizer(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    first = next(k for k, v in sd["state"][0].items() if v.shape == (12,) and v.abs().sum() > 0)

    def zeroed(_, sd: dict) -> dict:
        state = {i: {**s, first: torch.zeros_like(s[first])} for i, s in sd["state"].items()}
        return {**sd, "state": state}

    loaded, seen = [], []
    other = LSTMOptimizer(nn.Linear(4, 3).parameters())
    other.register_load_state_dict_pre_hook(zeroed)
    other.register_load_state_dict_post_hook(lambda o: loaded.append(len(o.state)))
    other.load_state_dict(sd)
    assert loaded == [2] and all(float(s[first].abs().sum()) == 0 for s in other.state.values())
    empty = LSTMOptimizer(nn.Linear(4, 3).parameters(), lr=0.5)
    empty.register_load_state_dict_pre_hook(lambda _, sd: {**sd, "state": {}})
    empty.load_state_dict(sd)
    assert len(empty.state) == 0 and empty.param_groups[0]["lr"] == 1.0
    opt.register_state_dict_post_hook(lambda _, sd: seen.append("rule" in sd))
    opt.state_dict()
    assert seen == [True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_one_element_tensor_lr_steps_as_the_number(dtype: torch.dtype) -> None:
    a, b = nn.Parameter(torch.ones(4, 3, dtype=dtype)), nn.Parameter(torch.ones(4, 3, dtype=dtype))
    opts = LSTMOptimizer([a], lr=torch.tensor([0.5])), LSTMOptimizer([b], lr=0.5)
    for p, opt in zip((a, b), opts):
        p.grad = torch.linspace(-1, 1, 12, dtype=dtype).reshape(4, 3)
        opt.step()
    assert torch.equal(a, b) and not torch.equal(a, torch.ones(4, 3, dtype=dtype))


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_half_precision_parameters_step_in_float32(state_dtype: torch.dtype | None) -> None:
    """A bfloat16 parameter's step is computed in float32, as a float16 one's: in bfloat16 a
    moving average whose weight is below half its last place stalls (beta 0.999 stopped at a
    third of its value), whatever the state's storage. Its state then follows a float32
    parameter's given the same gradients (its new value is rounded once: tests/test_higher.py)."""
    params = {dtype: nn.Parameter(torch.ones(16, dtype=dtype)) for dtype in
              (torch.float32, torch.bfloat16, torch.float16)}  # fmt: skip
    opts = {d: LSTMOptimizer([p], state_dtype=state_dtype) for d, p in params.items()}
    for _ in range(600):
        for d, p in params.items():
            p.grad = torch.ones(16, dtype=d)
            opts[d].step()
    exact = opts[torch.float32].state[params[torch.float32]]
    for d in (torch.bfloat16, torch.float16):
        state = opts[d].state[params[d]]
        for key, value in exact.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                torch.testing.assert_close(
                    state[key].float(), value.float(), rtol=1e-2, atol=1e-3, msg=key
                )


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_a_large_float16_parameter_steps_in_chunks_as_in_one_pass(
    state_dtype: torch.dtype | None,
) -> None:
    """A float16 tensor of more than ``chunk_size`` coordinates is stepped twice in chunks (its
    update checked with the state left as it was, then taken in place): the same new values and
    state, bit for bit, as the whole tensor's forward out of place (on up to one block of the
    chunked step's coordinates; beyond, its sums are added chunk by chunk)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(LSTMOptimizer.chunk_size + 7,), (96, 100)]  # a vector, and a matrix (Muon's)
    init = [torch.randn(s, generator=gen).half() for s in shapes]
    runs = []
    for chunk_size in (LSTMOptimizer.chunk_size, 10**9):  # two passes in chunks; one whole
        params = [nn.Parameter(x.clone()) for x in init]
        opt = LSTMOptimizer(params, state_dtype=state_dtype, total_steps=20)
        opt.chunk_size = chunk_size
        for step in range(4):
            g = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).half() * 10.0**-step
            opt.step()
        runs.append((params, opt))
    (chunked, c_opt), (whole, w_opt) = runs
    for a, b in zip(chunked, whole):
        assert torch.equal(a, b)
        assert sorted(c_opt.state[a]) == sorted(w_opt.state[b])
        for key, value in w_opt.state[b].items():
            assert c_opt.state[a][key].dtype == value.dtype, key
            assert torch.equal(c_opt.state[a][key], value), key


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64])
def test_parameters_that_are_not_real_floating_point_are_refused(dtype: torch.dtype) -> None:
    """Refused when given (a complex parameter once failed mid-step, after a real one had
    stepped), not at the first step."""
    odd = torch.zeros(3, dtype=dtype)
    with pytest.raises(TypeError, match="real floating-point parameters"):
        LSTMOptimizer([nn.Parameter(torch.ones(2)), odd])
    opt = LSTMOptimizer([nn.Parameter(torch.ones(2))])
    with pytest.raises(TypeError, match="real floating-point parameters"):
        opt.add_param_group({"params": [odd]})
    assert len(opt.param_groups) == 1


def test_a_single_tensor_as_the_parameters_is_refused_as_torch_optim_does() -> None:
    """Not iterated into its rows (each taken for a parameter)."""
    for params in (nn.Parameter(torch.ones(6, 5)), torch.ones(6, 5), torch.ones(())):
        with pytest.raises(TypeError, match="iterable of Tensors"):
            LSTMOptimizer(params)


def test_a_state_saved_for_other_parameters_is_refused_and_nothing_changes() -> None:
    """Another parameter's shape (the same size, so torch's own checks pass) or another
    optimizer's state: a clear error, the optimizer as it was."""

    def trained(shapes: list[tuple[int, ...]]) -> LSTMOptimizer:
        params = [nn.Parameter(torch.ones(s)) for s in shapes]
        opt = LSTMOptimizer(params)
        for p in params:
            p.grad = torch.ones(s := p.shape) * torch.arange(p.numel()).reshape(s)
        opt.step()
        return opt

    opt = trained([(5, 6), (7,)])
    before = {k: v.clone() for k, v in opt.state[opt.param_groups[0]["params"][0]].items()}
    with pytest.raises(ValueError, match="as a \\[6, 5\\] matrix"):
        opt.load_state_dict(trained([(6, 5), (7,)]).state_dict())
    with pytest.raises(ValueError, match="'prev' of shape \\(7,\\), not \\(30,\\)"):
        opt.load_state_dict(trained([(7,), (5, 6)]).state_dict())
    adamw_params = [nn.Parameter(torch.ones(5, 6)), nn.Parameter(torch.ones(7))]
    adamw = torch.optim.AdamW(adamw_params)
    for p in adamw_params:
        p.grad = torch.ones_like(p)
    adamw.step()
    with pytest.raises(ValueError, match="lacks .*not saved by"):
        opt.load_state_dict(adamw.state_dict())
    after = opt.state[opt.param_groups[0]["params"][0]]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert opt.param_groups[0]["lr"] == 1.0


def test_a_state_dict_brings_its_rule_and_the_weights_metadata() -> None:
    """Loading a state saved with other weights of the same rule kind resumes that run: its
    rule, with a warning, and ``opt.metadata`` then describes those weights, not the ones
    built with. The same weights load without one."""
    from learned_opt import pretrained

    a, b = nn.Parameter(torch.ones(4, 3)), nn.Parameter(torch.ones(4, 3))
    full = LSTMOptimizer([a])
    a.grad = torch.ones(4, 3)
    full.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LSTMOptimizer([nn.Parameter(torch.ones(4, 3))]).load_state_dict(full.state_dict())
    lean = LSTMOptimizer([b], weights="general-v7-lean")
    assert lean.metadata == pretrained.metadata("general-v7-lean")
    with pytest.warns(UserWarning, match="saved with other weights"):
        lean.load_state_dict(full.state_dict())
    assert lean.metadata == full.metadata == pretrained.metadata(pretrained.DEFAULT)
    assert lean.rule.unwrapped.lstm


def test_step_with_closure_returns_loss(rule) -> None:
    model = _model()
    opt = LSTMOptimizer(model.parameters(), weights=rule)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _loss(model)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    assert opt.step() is None


def test_parameters_without_grad_are_untouched(rule) -> None:
    a, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    opt = LSTMOptimizer([a, b], weights=rule)
    b_before = b.detach().clone()
    (a**2).sum().backward()
    opt.step()
    assert torch.equal(b, b_before)
    assert b not in opt.state or len(opt.state[b]) == 0
    assert set(opt.state[a]) == {"h0", "c0", "h1", "c1", "step"}
    assert opt.state[a]["h1"].shape == (3, 20)


def test_param_groups_and_lr_multiplier(rule) -> None:
    a, b = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(4))
    opt = LSTMOptimizer([{"params": [a]}, {"params": [b], "lr": 0.0}], weights=rule)
    (a.sum() + b.sum()).backward()
    opt.step()
    assert not torch.equal(a, torch.ones(4))
    assert torch.equal(b, torch.ones(4))
    c = nn.Parameter(torch.ones(2))
    opt.add_param_group({"params": [c], "lr": 0.5})
    assert opt.param_groups[-1]["lr"] == 0.5
    c.grad = torch.ones(2)
    opt.step()
    assert not torch.equal(c, torch.ones(2))


def test_lr_multiplier_scales_the_update(rule) -> None:
    updates = []
    for lr in (1.0, 0.25):
        p = nn.Parameter(torch.ones(3))
        opt = LSTMOptimizer([p], weights=rule, lr=lr)
        p.grad = torch.tensor([1.0, -2.0, 3.0])
        opt.step()
        updates.append(p.detach() - 1)
    torch.testing.assert_close(updates[1], 0.25 * updates[0])


def test_works_with_lr_scheduler(rule) -> None:
    p = nn.Parameter(torch.ones(3))
    opt = LSTMOptimizer([p], weights=rule)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.125)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_noncontiguous_and_zero_dim(rule, dtype: torch.dtype) -> None:
    base = torch.randn(6, 4, dtype=dtype)
    start = base.t().contiguous()
    noncontig = nn.Parameter(base.t())  # 4 x 6, non-contiguous
    scalar = nn.Parameter(torch.tensor(2.0, dtype=dtype))
    assert not noncontig.is_contiguous()
    opt = LSTMOptimizer([noncontig, scalar], weights=rule)
    before = [noncontig.detach().clone(), scalar.detach().clone()]
    for _ in range(3):
        opt.zero_grad()
        ((noncontig**2).sum() + scalar**2).backward()
        opt.step()
    assert noncontig.dtype == dtype and scalar.dtype == dtype
    assert opt.state[noncontig]["h0"].dtype == dtype
    assert not torch.equal(noncontig, before[0]) and not torch.equal(scalar, before[1])
    assert opt.state[scalar]["c1"].shape == (1, 20)
    # The coordinatewise rule treats each coordinate alike, whatever the memory layout.
    contig = nn.Parameter(start)
    opt2 = LSTMOptimizer([contig], weights=rule)
    for _ in range(3):
        opt2.zero_grad()
        (contig**2).sum().backward()
        opt2.step()
    torch.testing.assert_close(contig, noncontig)


def test_state_dict_round_trip_through_weights_only_load(rule) -> None:
    model = _model()
    opt = LSTMOptimizer(model.parameters(), weights=rule)
    for _ in range(3):
        opt.zero_grad()
        _loss(model).backward()
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    model2 = _model()
    model2.load_state_dict(saved["model"])
    opt2 = LSTMOptimizer(model2.parameters(), weights=learned_opt.LSTMRule())  # other weights
    with pytest.warns(UserWarning, match="saved with other weights"):
        opt2.load_state_dict(saved["opt"])
    for m, o in ((model, opt), (model2, opt2)):
        for _ in range(3):
            o.zero_grad()
            _loss(m).backward()
            o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sparse_gradients_are_rejected(rule) -> None:
    emb = nn.Embedding(10, 3, sparse=True)
    opt = LSTMOptimizer(emb.parameters(), weights=rule)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_non_finite_gradient_is_skipped_with_a_warning(rule) -> None:
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = LSTMOptimizer([a, b], weights=rule)
    a.grad = torch.tensor([1.0, float("nan"), 1.0])
    b.grad = torch.ones(3)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert torch.equal(a, torch.ones(3))
    assert len(opt.state[a]) == 0  # state neither created nor advanced
    assert not torch.equal(b, torch.ones(3))
    assert torch.isfinite(a).all() and torch.isfinite(b).all()


def test_non_finite_gradient_raise_policy_changes_nothing(rule) -> None:
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = LSTMOptimizer([a, b], weights=rule, nonfinite="raise")
    a.grad = torch.ones(3)
    b.grad = torch.tensor([float("inf"), 1.0, 1.0])
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert torch.equal(a, torch.ones(3)) and torch.equal(b, torch.ones(3))


def test_finite_gradients_give_no_warning(rule) -> None:
    p = nn.Parameter(torch.ones(3))
    opt = LSTMOptimizer([p], weights=rule)
    p.grad = torch.tensor([1e-30, 1e30, 0.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert torch.isfinite(p).all()


@pytest.mark.parametrize("family", ["quadratic", "digits"])
def test_drop_in_equals_unroll_with_frozen_rule(rule, family: str) -> None:
    """k steps of the drop-in optimizer == k steps of the meta-training unroll."""
    steps = 8
    fam = make_family(family)
    task = fam.sample(torch.Generator().manual_seed(3))
    learner = OptimizerLearner(rule)
    windows = list(
        unroll(
            learner,
            task,
            torch.Generator().manual_seed(4),
            horizon=steps,
            truncation=steps,
            differentiable=False,
        )
    )
    unrolled = learner.params_of(task, windows[-1].state)

    task = fam.sample(torch.Generator().manual_seed(3))  # same data stream again
    params = {
        k: v.clone().requires_grad_(True)
        for k, v in task.init_params(torch.Generator().manual_seed(4)).items()
    }
    opt = LSTMOptimizer(list(params.values()), weights=rule)
    for _ in range(steps):
        opt.zero_grad()
        task.loss(params, task.train.sample()).backward()
        opt.step()
    for name, value in params.items():
        torch.testing.assert_close(value.detach(), unrolled[name].detach(), rtol=1e-5, atol=1e-6)


def test_generic_learned_optimizer_with_sgd_rule() -> None:
    p = nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = LearnedOptimizer([p], SGDRule(lr=0.5))
    p.grad = torch.tensor([1.0, 1.0])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.5, 1.5]))
    with pytest.raises(TypeError):
        LearnedOptimizer([p], rule=torch.nn.Linear(1, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(rule) -> None:
    cpu = nn.Parameter(torch.randn(5, 3))
    gpu = nn.Parameter(cpu.detach().cuda())
    opts = [LSTMOptimizer([cpu], weights=rule), LSTMOptimizer([gpu], weights=rule)]
    for _ in range(3):
        for p, o in zip((cpu, gpu), opts):
            o.zero_grad()
            (p**2).sum().backward()
            o.step()
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_rules_without_an_in_place_step_run_in_chunks_with_the_same_result(state_dtype) -> None:
    from learned_opt.rules import GeneralLSTMRule

    rule = GeneralLSTMRule(hidden_size=8)
    rule.reset_parameters(torch.Generator().manual_seed(0), zero_output=False)
    grads = [torch.randn(1000, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    params, opts = [], []
    for chunk in (1000, 64):  # one call per tensor, and 16 calls
        p = torch.nn.Parameter(torch.zeros(1000))
        opt = LearnedOptimizer([p], rule, state_dtype=state_dtype)
        opt.chunk_size = chunk
        for g in grads:
            p.grad = g.clone()
            opt.step()
        params.append(p)
        opts.append(opt)
    torch.testing.assert_close(params[0], params[1], rtol=1e-6, atol=1e-7)
    for key, value in opts[0].state[params[0]].items():
        torch.testing.assert_close(value, opts[1].state[params[1]][key], rtol=1e-5, atol=1e-6)
    assert int(opts[1].state[params[1]]["step"]) == 3


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(5, 6, generator=gen), torch.randn(5, 3, generator=gen)
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("weights", ["general-v7", "general-v7-lean"])
def test_a_step_under_autocast_is_the_step_without_it(weights: str) -> None:
    """The rule's matrix products (Muon's iterations, the LSTM, the controller) ran in
    bfloat16 inside ``torch.autocast``: each update moved by a few percent."""
    runs = []
    for autocast in (False, True):
        model = _small_model()
        opt = LSTMOptimizer(model.parameters(), weights=weights)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_the_runs_length_is_kept_by_a_state_dict_saved_before_the_first_step() -> None:
    """Saved where no parameter has a state yet (a checkpoint at step 0), the run's length is
    still taken by an optimizer built without one, and the run continues as the original."""
    original, resumed = _small_model(), _small_model()
    first = LSTMOptimizer(original.parameters(), total_steps=100)
    sd = first.state_dict()
    second = LSTMOptimizer(resumed.parameters())
    second.load_state_dict(sd)
    assert second.total_steps == 100
    _train(original, first)
    _train(resumed, second)
    assert all(torch.equal(a, b) for a, b in zip(original.parameters(), resumed.parameters()))
    paper = LSTMOptimizer(_small_model().parameters(), weights="paper-mnist")
    paper_sd = paper.state_dict()
    assert paper_sd["total_steps"] is None
    paper.load_state_dict(paper_sd)
    assert paper.total_steps is None


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_a_float64_state_beyond_its_storage_range_is_clamped_not_infinite(
    state_dtype: torch.dtype,
) -> None:
    """A float64 gradient of 1e20 (finite, inside the rule's float64 bound) makes a second
    moment beyond float32's range: stored in 32 bits it was Inf, and every later update of the
    tensor non-finite (skipped for good). It is stored as the largest finite value."""
    p = nn.Parameter(torch.ones(8, dtype=torch.float64))
    opt = LSTMOptimizer([p], state_dtype=state_dtype, nonfinite="raise")
    p.grad = torch.full_like(p, 1e20)
    opt.step()
    assert all(torch.isfinite(v).all() for v in opt.state[p].values())
    for _ in range(3):
        before = p.detach().clone()
        p.grad = torch.ones_like(p)
        opt.step()
        assert torch.isfinite(p).all() and not torch.equal(p, before)
