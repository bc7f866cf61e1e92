"""What a user extending the library meets: a rule, a task or a learner of their own, saved,
resumed and meta-trained; the mistakes such code makes get clear errors, before any change."""

from __future__ import annotations

import enum
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from learned_opt import LearnedOptimizer, LSTMRule, load_rule, save_rule
from learned_opt.learners import MAMLLearner, OptimizerLearner
from learned_opt.outer import MetaTrainConfig, MetaTrainer
from learned_opt.rules import RULES, build_rule
from learned_opt.rules.base import RuleState, UpdateRule
from learned_opt.tasks import QuadraticFamily

SMALL = dict(family="quadratic", horizon=6, truncation=3, eval_tasks=2, eval_every=1, seed=0)


class ScaledSign(UpdateRule):
    """``update = -exp(log_lr) * sign(m)``, ``m <- 0.9 m + g``: a rule of a user's own, whose
    configuration holds a numpy number (as a user's code easily makes it)."""

    kind = "test-scaled-sign"

    def __init__(self, init_log_lr: float = float(np.log(0.05))) -> None:
        super().__init__()
        self.init_log_lr = init_log_lr
        self.log_lr = nn.Parameter(torch.tensor(float(init_log_lr)))

    def init_state(self, numel: int, *, like: Tensor) -> RuleState:
        return {"m": torch.zeros(numel, dtype=like.dtype, device=like.device)}

    def forward(self, grad: Tensor, state: RuleState) -> tuple[Tensor, RuleState]:
        m = 0.9 * state["m"] + grad
        return -torch.exp(self.log_lr) * torch.tanh(10 * m), {"m": m}

    def config(self) -> dict:
        return {"init_log_lr": np.float64(self.init_log_lr)}  # a numpy scalar


class SameKindLSTM(LSTMRule):
    """A subclass that keeps its parent's kind: its weights would load back as an LSTMRule."""

    def forward(self, grad: Tensor, state: RuleState) -> tuple[Tensor, RuleState]:
        update, new = super().forward(grad, state)
        return 2 * update, new


def test_a_rule_of_ones_own_is_known_by_its_kind_and_saves_loads_and_resumes(tmp_path) -> None:
    """Defining the class enters it under its kind: weights files, the drop-in optimizer's
    state dict (read back safely) and a meta-trainer's checkpoints all bring it back, numpy
    numbers in its configuration and metadata included."""
    assert RULES["test-scaled-sign"] is ScaledSign
    assert isinstance(build_rule("test-scaled-sign", {"init_log_lr": -2.0}), ScaledSign)
    rule = ScaledSign()
    with torch.no_grad():
        rule.log_lr.fill_(-1.5)
    save_rule(tmp_path / "w.pt", rule, {"loss": np.float32(0.5), "where": tmp_path})
    loaded, meta = load_rule(tmp_path / "w.pt")
    assert type(loaded) is ScaledSign and float(loaded.log_lr.detach()) == -1.5
    assert meta == {"loss": 0.5, "where": str(tmp_path)}

    p = nn.Parameter(torch.ones(5))
    opt = LearnedOptimizer([p], rule)
    p.grad = torch.ones(5)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    again = LearnedOptimizer([nn.Parameter(p.detach().clone())], ScaledSign())
    with pytest.warns(UserWarning, match="saved with other weights"):  # log_lr -1.5, not -3
        again.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert type(again.rule) is ScaledSign and float(again.rule.log_lr.detach()) == -1.5

    config = MetaTrainConfig(iterations=2, checkpoint_every=1, **SMALL)
    first = MetaTrainer(config, learner=OptimizerLearner(ScaledSign()), ckpt_dir=tmp_path / "c")
    first.train()
    resumed = MetaTrainer(config, learner=OptimizerLearner(ScaledSign()), ckpt_dir=tmp_path / "c")
    assert resumed.resume() and resumed.iteration == 2
    best, _ = load_rule(tmp_path / "c" / "best.pt")
    assert type(best) is ScaledSign


def test_a_rule_that_would_load_back_as_another_class_says_so(tmp_path) -> None:
    """A subclass keeping its parent's kind is saved with a warning and loads back, with
    another, as the parent (a meta-trainer warns when it starts); a rule without a kind cannot
    be saved; a kind taken by another class is refused when the class is defined."""
    with pytest.warns(UserWarning, match="keeps the kind 'lstm' of LSTMRule"):
        save_rule(tmp_path / "w.pt", SameKindLSTM())
    with pytest.warns(UserWarning, match="saved from .*SameKindLSTM; it loads as .*LSTMRule"):
        assert type(load_rule(tmp_path / "w.pt")[0]) is LSTMRule
    with pytest.warns(UserWarning, match="keeps the kind"):
        MetaTrainer(MetaTrainConfig(**SMALL), learner=OptimizerLearner(SameKindLSTM()))

    class NoKind(UpdateRule):
        def config(self) -> dict:
            return {}

    with pytest.raises(ValueError, match="has no kind"):
        save_rule(tmp_path / "none.pt", NoKind())
    assert not (tmp_path / "none.pt").exists()
    with pytest.raises(TypeError, match="'adam' is taken"):

        class AlsoAdam(UpdateRule):
            kind = "adam"

    assert RULES["adam"].__name__ == "AdamRule"


def test_a_rule_class_defined_again_or_rebuilt_elsewhere_still_saves(tmp_path) -> None:
    """An instance of a class defined again under the same name (a module reloaded, a cell run
    again) saves as that kind; a class a by-value pickler rebuilt without entering it (as
    cloudpickle does in a worker) is entered when its weights are first saved."""
    old = ScaledSign()
    namespace: dict = {}
    exec(  # the same class, defined again in this module under the same name
        "class ScaledSign(UpdateRule):\n    kind = 'test-scaled-sign'\n",
        {"UpdateRule": UpdateRule, "__name__": __name__},
        namespace,
    )
    try:
        assert RULES["test-scaled-sign"] is namespace["ScaledSign"]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            save_rule(tmp_path / "old.pt", old)
    finally:
        RULES["test-scaled-sign"] = ScaledSign
    del RULES["test-scaled-sign"]  # as in a process where the class was never entered
    try:
        save_rule(tmp_path / "late.pt", ScaledSign())
        assert RULES["test-scaled-sign"] is ScaledSign
    finally:
        RULES["test-scaled-sign"] = ScaledSign


class Opaque:
    """An object a safe load refuses."""


def test_what_a_safe_load_would_refuse_is_not_written(tmp_path: Path) -> None:
    """Metadata holding an object a safe load refuses raises before the file is written: the
    weights file there is kept, and nothing is left that a resume would set aside. What a
    safe load reads (sets, sizes, tuple keys) is kept; enumerations become their values."""
    save_rule(tmp_path / "w.pt", ScaledSign(), {"n": 1})
    with pytest.raises(TypeError, match=r"the metadata\['bad'\] is a .*Opaque"):
        save_rule(tmp_path / "w.pt", ScaledSign(), {"bad": Opaque()})
    assert load_rule(tmp_path / "w.pt")[1] == {"n": 1}

    class Mode(str, enum.Enum):
        FAST = "fast"

    kept = {"s": {1, 2}, "size": torch.Size([3]), (1, 2): "t", "mode": Mode.FAST}
    save_rule(tmp_path / "w.pt", ScaledSign(), kept)
    assert load_rule(tmp_path / "w.pt")[1] == {**kept, "mode": "fast"}


class DropsState(UpdateRule):
    """A rule whose state has a per-coordinate entry it never returns (a counter it only
    reads): as in one call, it keeps its value when the drop-in optimizer steps in chunks."""

    kind = "test-drops-state"

    def init_state(self, numel: int, *, like: Tensor) -> RuleState:
        return {"scale": torch.full((numel,), 0.1, dtype=like.dtype), "m": torch.zeros_like(like)}

    def forward(self, grad: Tensor, state: RuleState) -> tuple[Tensor, RuleState]:
        return -state["scale"] * grad, {"m": grad}

    def config(self) -> dict:
        return {}


def test_a_state_entry_the_rule_does_not_return_keeps_its_value_in_chunks() -> None:
    chunked, whole = nn.Parameter(torch.ones(10)), nn.Parameter(torch.ones(10))
    a, b = LearnedOptimizer([chunked], DropsState()), LearnedOptimizer([whole], DropsState())
    a.chunk_size = 3
    for _ in range(2):
        chunked.grad, whole.grad = torch.ones(10), torch.ones(10)
        a.step()
        b.step()
    assert torch.equal(a.state[chunked]["scale"], torch.full((10,), 0.1))
    assert torch.equal(chunked, whole)


class Wrong(UpdateRule):
    kind = "test-wrong-output"

    def __init__(self, mistake: str = "scalar") -> None:
        super().__init__()
        self.mistake = mistake

    def init_state(self, numel: int, *, like: Tensor) -> RuleState:
        return {}

    def forward(self, grad: Tensor, state: RuleState):
        if self.mistake == "scalar":
            return -grad.sum(), state
        if self.mistake == "column":
            return -grad[:, None], state
        return -grad  # the update alone

    def config(self) -> dict:
        return {"mistake": self.mistake}


@pytest.mark.parametrize(
    "mistake, error", [("scalar", ValueError), ("column", ValueError), ("alone", TypeError)]
)
def test_a_rule_output_of_the_wrong_form_is_refused_in_both_paths(mistake, error) -> None:
    """An update that is not the gradient's shape, or an output that is not ``(update,
    state)``, raises in the drop-in optimizer (the parameter unchanged) and in the unroll
    (which would otherwise broadcast a scalar over every coordinate)."""
    from learned_opt.outer import run_inner

    p = nn.Parameter(torch.ones(2, 3))
    opt = LearnedOptimizer([p], Wrong(mistake))
    p.grad = torch.ones(2, 3)
    with pytest.raises(error, match="update|new_state"):
        opt.step()
    assert torch.equal(p, torch.ones(2, 3))
    task = QuadraticFamily(dim=3).sample(torch.Generator().manual_seed(0))
    with pytest.raises(error, match="update|new_state"):
        run_inner(OptimizerLearner(Wrong(mistake)), task, torch.Generator().manual_seed(0), 2)


def test_a_task_of_ones_own_gets_clear_errors_for_its_mistakes() -> None:
    """An ``init_fn`` that leaves a parameter out (the model's own, untrained, would stand in
    for it) and a loss that is not a scalar are refused with the task's name."""
    task = QuadraticFamily(dim=3).sample(torch.Generator().manual_seed(0))
    params = task.init_params(torch.Generator().manual_seed(0))
    name = next(iter(params))
    task.init_fn = lambda g: {}
    with pytest.raises(ValueError, match=f"a tensor for each model parameter, \\['{name}'\\]"):
        task.init_params(torch.Generator().manual_seed(0))
    loss_fn = task.loss_fn
    task.loss_fn = lambda out, y: loss_fn(out, y) * torch.ones(2)
    with pytest.raises(ValueError, match="loss_fn must return a scalar tensor, not shape"):
        task.loss(params, task.train.sample())
    # a one-element loss and an init_fn that also gives buffers (a state dict) are fine
    task.loss_fn = lambda out, y: loss_fn(out, y).reshape(1)
    assert task.loss(params, task.train.sample()).shape == ()
    task.init_fn = lambda g: {**params, "extra_buffer": torch.zeros(1)}
    assert set(task.init_params(torch.Generator())) == {name, "extra_buffer"}


def test_a_learner_of_ones_own_refuses_the_rule_settings_and_a_rule_export() -> None:
    """``init_weights`` and ``rule_kwargs`` configure the rule the configuration builds (a
    learner given brings its own); a learner without a rule has no rule to export."""
    from learned_opt.tasks.fewshot import SinusoidFamily

    family = SinusoidFamily(k_shot=5, n_query=10)
    learner = OptimizerLearner(LSTMRule(hidden_size=8))
    for setting in ({"init_weights": "general-v7"}, {"rule_kwargs": {"hidden_size": 8}}):
        with pytest.raises(ValueError, match=next(iter(setting))):
            MetaTrainer(MetaTrainConfig(**{**SMALL, **setting}), learner=learner)
    cfg = MetaTrainConfig(horizon=2, truncation=2, objective="test", meta_batch=1, iterations=1,
                          eval_every=0)  # fmt: skip
    maml = MAMLLearner(family.model, inner_steps=2, inner_lr=0.05)
    maml = MetaTrainer(cfg, learner=maml, family=family)
    maml.train()
    with pytest.raises(ValueError, match="MAMLLearner has none"):
        maml.export_best("unused.pt")


def test_a_meta_trainer_names_what_it_was_given_instead_of_a_learner_or_a_family() -> None:
    """A rule given as the learner, a family's name as the family, a learner with nothing to
    meta-train, and a method a subclass left out each get an error that says so."""
    from learned_opt.rules import SGDRule

    with pytest.raises(TypeError, match=r"wrap a rule: OptimizerLearner\(rule\)"):
        MetaTrainer(MetaTrainConfig(**SMALL), learner=ScaledSign())
    with pytest.raises(TypeError, match="family must be a TaskFamily, not a str"):
        MetaTrainer(MetaTrainConfig(**SMALL), family="quadratic")
    with pytest.raises(ValueError, match="no parameter to meta-train"):
        MetaTrainer(MetaTrainConfig(**SMALL), learner=OptimizerLearner(SGDRule()))

    class OpaqueConfig(QuadraticFamily):
        def config(self) -> dict:
            return {**super().config(), "how": Opaque()}

    with pytest.raises(TypeError, match=r"the family's config\['how'\]"):  # at start
        MetaTrainer(MetaTrainConfig(**SMALL), family=OpaqueConfig())

    class Unfinished(UpdateRule):
        kind = "test-unfinished"

    with pytest.raises(NotImplementedError, match="Unfinished must implement forward"):
        Unfinished()(torch.ones(2), {})
