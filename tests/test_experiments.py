"""The recipes of the shipped weights and the few-shot comparison: each runs (tiny versions of
its steps), and each recipe runs the command recorded with the weights it produced."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import runpy
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from learned_opt import LSTMOptimizer, LSTMRule, pretrained
from learned_opt.checkpoint import load_rule, save_rule
from learned_opt.report import write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def test_fewshot_compare_smoke(tmp_path: Path, run_script) -> None:
    assert run_script("experiments/fewshot_compare.py", "--smoke", "--out", str(tmp_path)) == 0
    table = (tmp_path / "table.md").read_text()
    for learner in ("maml", "rnn", "lstm-optimizer", "general-optimizer", "scratch-adam"):
        assert f"| {learner} |" in table
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_fewshot_compare_runs_only_the_learners_asked_for(tmp_path: Path, run_script) -> None:
    args = ("--smoke", "--learners", "maml,scratch-adam", "--out", str(tmp_path))
    assert run_script("experiments/fewshot_compare.py", *args) == 0
    table = (tmp_path / "table.md").read_text()
    assert "maml" in table and "scratch-adam" in table
    assert "| rnn |" not in table and "lstm-optimizer" not in table


def test_fewshot_compare_merge_orders_rows(tmp_path: Path, run_script) -> None:
    """Runs split over processes merge into one table: by family, K, then learner."""

    def rec(family: str, k: int, learner: str, mean: float) -> dict:
        return {"family": family, "k_shot": k, "learner": learner, "metric": "accuracy",
                "mean": mean, "ci95": 0.01, "tasks": 200, "seconds": 1.0}  # fmt: skip

    write_jsonl(tmp_path / "a" / "records.jsonl", [rec("mnist", 5, "scratch-adam", 0.7)])
    write_jsonl(
        tmp_path / "b" / "records.jsonl",
        [rec("mnist", 5, "general-optimizer", 0.72), rec("mnist", 1, "maml", 0.6)],
    )
    merged = f"{tmp_path / 'a'},{tmp_path / 'b'}"
    assert (
        run_script(
            "experiments/fewshot_compare.py", "--merge", merged, "--out", str(tmp_path / "m")
        )
        == 0
    )
    rows = (tmp_path / "m" / "table.md").read_text().splitlines()[2:]
    assert [r.split("|")[3].strip() for r in rows] == ["maml", "general-optimizer", "scratch-adam"]
    assert "+2.0 pp (better)" in rows[1]


#: Options whose values are where a run writes (or reads its start), not what it does.
PATH_OPTIONS = {"--log-dir", "--ckpt-dir", "--export", "--init-weights"}

#: The recipe of each shipped weights file.
RECIPES = {
    "general": "experiments/general.py",
    "general-v2": "experiments/adaptation_rate.py",
    "general-v3": "experiments/adam_betas.py",
    "general-v4": "experiments/adaptation_shrink.py",
    "general-v5": "experiments/horizon_decay.py",
    "general-v6": "experiments/orthogonal_direction.py",
    "general-v7": "experiments/learned_adaptation.py",
    "general-v7-lean": "experiments/lean_default.py",
    "general-v4-wide": "experiments/size_scaled_default.py",
    "general-wide": "experiments/size_scaled_step.py",
    "paper-mnist": "experiments/mnist_paper.py",
    "quadratic": "experiments/quadratic.py",
}


def _options(command: str, drop: set[str] = PATH_OPTIONS) -> list[str]:
    """The words of a ``learned-opt`` command without the values of the options in ``drop``
    and without ``--resume`` (which changes no result: a recipe passes it so that running it
    again continues or reuses its run rather than being refused an earlier run's folder)."""
    words, kept = shlex.split(command), []
    for i, word in enumerate(words):
        if word in drop or (i > 0 and words[i - 1] in drop) or word == "--resume":
            continue
        kept.append(word)
    return kept


def _option(command: str, name: str) -> str:
    words = shlex.split(command)
    return words[words.index(name) + 1]


def _recorded(out: str, stage: str) -> str:
    """What a recipe's dry run says the meta-training command ``stage`` records itself as."""
    marker = f"# {stage}; it records itself as: "
    (line,) = [line for line in out.splitlines() if line.startswith(marker)]
    return line[len(marker) :]


def test_every_shipped_weights_file_names_its_recipe() -> None:
    assert sorted(RECIPES) == pretrained.available()
    for name, script in RECIPES.items():
        assert pretrained.metadata(name)["recipe"] == f"python {script}"
        assert (ROOT / script).is_file()


@pytest.mark.parametrize("script", sorted(set(RECIPES.values())))
def test_every_recipe_has_a_dry_run_that_prints_and_runs_nothing(script: str, capsys) -> None:
    """The README's promise: each recipe's ``--dry-run`` prints what its steps would do."""
    before = {p: p.stat().st_mtime_ns for p in (ROOT / "runs").rglob("*") if p.is_file()}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        assert runpy.run_path(str(ROOT / script))["main"](["--dry-run"]) in (0, None)
    assert capsys.readouterr().out.strip()
    after = {p: p.stat().st_mtime_ns for p in (ROOT / "runs").rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.parametrize("name", ["general", "quadratic"])
def test_recipe_runs_the_recorded_meta_training_command(name: str, run_script, capsys) -> None:
    assert run_script(RECIPES[name], "--dry-run") == 0
    command = _recorded(capsys.readouterr().out, "meta-train")
    meta = pretrained.metadata(name)
    assert command.startswith("learned-opt meta-train ")
    assert _options(command) == _options(meta["command"])
    for run in meta.get("all_commands", []):  # every command of the run, where recorded
        assert _options(command) == _options(run["command"])


def test_general_recipe_launches_its_processes_with_the_recorded_options(
    run_script, capsys
) -> None:
    assert run_script("experiments/general.py", "--dry-run", "--out", "runs/x") == 0
    out = capsys.readouterr().out
    (launch,) = [line for line in out.splitlines() if " -m learned_opt meta-train " in line]
    words = shlex.split(launch)
    meta = pretrained.metadata("general")
    assert f"--nproc_per_node={meta['budget']['processes']}" in words
    recorded = "learned-opt " + shlex.join(words[words.index("meta-train") :])
    assert recorded == _recorded(out, "meta-train")
    assert _option(recorded, "--ckpt-dir") == "runs/x/ckpt"  # everything goes under --out
    assert "OMP_NUM_THREADS=1" in launch and meta["budget"]["torch_threads"] == 1


def test_mnist_paper_recipe_runs_the_recorded_stages(run_script, capsys) -> None:
    assert run_script("experiments/mnist_paper.py", "--dry-run") == 0
    out = capsys.readouterr().out
    meta = pretrained.metadata("paper-mnist")
    stage2 = _recorded(out, "stage2")
    assert _options(stage2) == _options(meta["command"])
    # stage 2 starts from what stage 1 exports
    stage1 = _recorded(out, "stage1")
    assert _option(stage2, "--init-weights") == _option(stage1, "--export")
    # stage 1 ran until its time budget, at iteration 1620; the recipe stops there
    first = meta["initialized_from"]
    budget = {*PATH_OPTIONS, "--iterations", "--time-budget"}
    assert _options(stage1, budget) == _options(first["all_commands"][0]["command"], budget)
    assert int(_option(stage1, "--iterations")) == first["iteration"]


def test_general_recipe_smoke_ships_weights_with_their_figures(tmp_path: Path, run_script) -> None:
    run, package, results = tmp_path / "run", tmp_path / "package", tmp_path / "results"
    args = ["--smoke", "--out", str(run), "--ship-to", str(package), "--results-to", str(results)]
    assert run_script("experiments/general.py", *args) == 0
    shipped, meta = load_rule(package / "general.pt")
    exported, _ = load_rule(run / "general.pt")
    for a, b in zip(shipped.parameters(), exported.parameters(), strict=True):
        assert torch.equal(a, b)  # only the metadata changed
    assert json.loads((package / "general.json").read_text()) == meta
    assert meta["recipe"] == "python experiments/general.py"
    assert meta["command"] == meta["all_commands"][0]["command"]
    assert meta["command"].startswith("learned-opt meta-train --family digits")
    streams = [s for e in meta["figures"]["by_steps"].values() for s in e["streams"]]
    assert sorted(meta["figures"]["by_steps"]) == ["3", "6"]
    table = (results / "3-stream0" / "table.md").read_text()
    assert (results / "3-stream0" / "records.jsonl").is_file()
    for stream in streams:
        (ratio,) = stream["ratios"].values()
        assert f"| wine-mlp-tanh-32 | {stream['steps']} | " in table and f"| {ratio:.3f} |" in table
        assert Path(stream["results"]) == results / "3-stream0"
    assert meta["figures"]["worst_ratio"] == max(s["worst"] for s in streams)

    # a ratio above 1 is refused, and so are tables of other weights; nothing is written
    recipe = runpy.run_path(str(ROOT / "experiments" / "general.py"))
    bench = run / "ood" / "3-stream0"
    lines = (bench / "table.md").read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("| wine-mlp-tanh-32 | 6 |"))
    lines[i] = lines[i].rsplit("|", 2)[0] + "| 1.500 |"
    (bench / "table.md").write_text("\n".join(lines) + "\n")
    refused = tmp_path / "refused"
    with pytest.raises(ValueError, match="above 1"):
        recipe["ship"](run / "general.pt", [bench], dest=refused, results_to=None)
    other = tmp_path / "general.pt"
    save_rule(other, LSTMRule(), {"config": {}, "all_commands": meta["all_commands"]})
    with pytest.raises(ValueError, match="benchmarked"):
        recipe["ship"](other, [bench], dest=refused, results_to=None, allow_above_one=True)
    assert not refused.exists()


def test_mnist_paper_ships_weights_with_their_benchmark_figures(tmp_path: Path, run_script) -> None:
    run_dir, bench, package = tmp_path / "run", tmp_path / "bench", tmp_path / "package"
    (run_dir / "stage2").mkdir(parents=True)
    # the smoke benchmark evaluates the packaged "quadratic" weights: ship a copy of those
    shutil.copyfile(pretrained.path("quadratic"), run_dir / "stage2" / "paper-mnist.pt")
    assert run_script("benchmarks/mnist_paper.py", "--smoke", "--out", str(bench)) == 0
    ship = ["--steps", "ship", "--out", str(run_dir), "--results-to", str(bench)]
    assert run_script("experiments/mnist_paper.py", *ship, "--ship-to", str(package)) == 0
    rule, meta = load_rule(package / "paper-mnist.pt")
    original, _ = load_rule(pretrained.path("quadratic"))
    for a, b in zip(rule.parameters(), original.parameters(), strict=True):
        assert torch.equal(a, b)  # only the metadata changed
    figures = meta["benchmark"]["figures"]["smoke"]
    assert figures["ratio_vs_adam"] == round(figures["lstm"] / figures["adam_tuned"], 3)
    assert "benchmarks/mnist_paper.py" in meta["benchmark"]["command"]
    assert meta["recipe"] == "python experiments/mnist_paper.py"
    assert json.loads((package / "paper-mnist.json").read_text()) == meta
    # weights other than the benchmarked ones are refused, and nothing is written
    torch.save({"other": torch.zeros(1)}, run_dir / "stage2" / "paper-mnist.pt")
    refused = tmp_path / "refused"
    assert run_script("experiments/mnist_paper.py", *ship, "--ship-to", str(refused)) == 2
    assert not refused.exists()


def _assert_written_by(checkpoint: Path, config) -> None:
    """The committed ``checkpoint`` (if any) was written by a run of ``config``: the same
    configuration up to where the run kept its files and the settings a resumed run may change,
    so ``--resume`` continues it."""
    from learned_opt import MetaTrainConfig
    from learned_opt.outer.checkpoints import RESUMABLE_CHANGES

    if not checkpoint.is_file():
        return
    state = torch.load(checkpoint, weights_only=True)
    free = {"init_weights", *RESUMABLE_CHANGES}
    saved = MetaTrainConfig.from_dict(state["config"]).to_dict()  # as resume reads it
    saved = {k: v for k, v in saved.items() if k not in free}
    mine = {k: v for k, v in config.to_dict().items() if k not in free}
    assert json.loads(json.dumps(saved)) == json.loads(json.dumps(mine))


def _assert_steps_like_the_default(
    rule, reference="general", reference_options: dict | None = None, **options
) -> None:
    """``LSTMOptimizer(weights=rule, **options)`` steps exactly like
    ``LSTMOptimizer(weights=reference, **reference_options)`` (the weights the candidates start
    from)."""
    from learned_opt import LSTMOptimizer

    gen = torch.Generator().manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3, generator=gen))]
    b = [torch.nn.Parameter(a[0].detach().clone())]
    first = LSTMOptimizer(a, weights=reference, **(reference_options or {}))
    opts = first, LSTMOptimizer(b, weights=rule, **options)
    for _ in range(5):
        g = torch.randn(5, 3, generator=gen)
        for p, opt in zip((a[0], b[0]), opts):
            p.grad = g.clone()
            opt.step()
    assert torch.equal(a[0], b[0])


def test_horizon_aware_recipe_resumes_its_committed_run_and_starts_from_the_default(
    tmp_path: Path, run_script, capsys, monkeypatch
) -> None:
    """The recipe of the run in progress: its command parses, its starting weights step exactly
    like the shipped default, and its committed checkpoint (if any) was written by this very
    command (same configuration), so ``--resume`` continues it."""
    from learned_opt.cli import build_parser, config_from_args

    assert run_script("experiments/horizon_aware.py", "--dry-run") == 0
    recipe = runpy.run_path(str(ROOT / "experiments/horizon_aware.py"))
    command = [c for c in capsys.readouterr().out.splitlines() if "meta-train" in c][0]
    argv = shlex.split(command)[3:]  # after "python -m learned_opt"
    assert argv == recipe["META_TRAIN"]
    assert set(recipe["RUNS"]) == {"test", "final-train"}
    runs = [(objective, m) for objective in recipe["RUNS"] for m in recipe["META_GRADIENTS"]]
    folders = {recipe["run_paths"](*run) for run in runs}
    assert len(folders) == len(runs)  # each run its own folder and checkpoint
    for objective, method in runs:
        argv = recipe["meta_train"](objective, method)
        config = config_from_args(build_parser().parse_args(argv))
        assert config.rule == "scheduled" and config.family == "meta-train-rescaled"
        assert config.objective == objective
        assert config.second_order == (method == "second-order")
        assert config.estimator == ("pes" if method == "pes" else "tbptt")
        assert config.clip_grad_per_task == (method != "first-order")
        assert str(recipe["run_paths"](objective, method)[0] / "ckpt") in argv
        _assert_written_by(ROOT / recipe["run_paths"](objective, method)[1], config)
    init = tmp_path / "init.pt"
    recipe["write_init"](init)
    _assert_steps_like_the_default(load_rule(init)[0], total_steps=10)


def _pes_recipe(
    script: str,
    run_script,
    capsys,
    tmp_path: Path,
    *,
    whole_unrolls: bool = True,
    family: str = "meta-train-rescaled",
):
    """A PES recipe's module, its meta-training configuration (checked: PES over whole unrolls,
    or over windows shorter than the shortest run if not ``whole_unrolls``, on ``family``,
    selection on the validation group, the committed checkpoint written by it) and its starting
    rule."""
    from learned_opt.cli import build_parser, config_from_args

    assert run_script(script, "--dry-run") == 0
    recipe = runpy.run_path(str(ROOT / script))
    command = [c for c in capsys.readouterr().out.splitlines() if "meta-train" in c][0]
    argv = shlex.split(command)[3:]  # after "python -m learned_opt"
    assert argv == recipe["META_TRAIN"]
    config = config_from_args(build_parser().parse_args(argv))
    assert config.estimator == "pes"
    if whole_unrolls:
        assert config.truncation >= config.horizon
    else:
        assert config.truncation < (config.min_horizon or config.horizon)
    assert config.family == family and config.eval_family == "validation"
    _assert_written_by(ROOT / recipe["CHECKPOINT"], config)
    init = tmp_path / "init.pt"
    recipe["write_init"](init)
    return recipe, config, load_rule(init)[0]


def _controller_recipe(script: str, run_script, capsys, tmp_path: Path):
    """:func:`_pes_recipe` of a recipe that meta-trains only a controller."""
    recipe, config, rule = _pes_recipe(script, run_script, capsys, tmp_path)
    trained = [n for n, p in rule.named_parameters() if p.requires_grad]
    assert trained and all(n.startswith("controller_") for n in trained)
    return recipe, config, rule


def test_lstm_pes_recipe_starts_from_the_default(tmp_path: Path, run_script, capsys) -> None:
    """The LSTM recipe: PES over whole unrolls of ``general-v2``'s LSTM and read-out (nothing
    else meta-trained), starting from ``general-v2`` step for step."""
    _, _, rule = _pes_recipe("experiments/lstm_pes.py", run_script, capsys, tmp_path)
    trained = {n for n, p in rule.named_parameters() if p.requires_grad}
    assert trained == {"weight_ih_l0", "weight_hh_l0", "bias_l0", "out_weight", "out_bias"}
    _assert_steps_like_the_default(rule, reference="general-v2")


def test_truncated_pes_recipe_trains_the_lstm_and_a_gain_from_the_default(
    tmp_path: Path, run_script, capsys
) -> None:
    """The truncated-PES recipe: PES over windows shorter than every run, of ``general-v2``'s
    LSTM and read-out and a zero adaptation gain (both meta-trained), starting from
    ``general-v2`` step for step."""
    script = "experiments/truncated_pes.py"
    _, _, rule = _pes_recipe(script, run_script, capsys, tmp_path, whole_unrolls=False)
    trained = {n for n, p in rule.named_parameters() if p.requires_grad}
    assert {"weight_ih_l0", "out_weight"} <= trained
    assert any(n.startswith("controller_") for n in trained)
    _assert_steps_like_the_default(rule, reference="general-v2")


def test_adaptation_gain_recipe_resumes_its_committed_run_and_starts_from_the_default(
    tmp_path: Path, run_script, capsys
) -> None:
    """The learned-gain recipe: its command parses (PES over whole unrolls, only the controller
    meta-trained), its starting weights step exactly like the shipped default, and its
    committed checkpoint (if any) was written by this very command."""
    _, _, rule = _controller_recipe("experiments/adaptation_gain.py", run_script, capsys, tmp_path)
    _assert_steps_like_the_default(rule)


def test_learned_schedule_recipe_trains_only_a_schedule_around_the_default(
    tmp_path: Path, run_script, capsys
) -> None:
    """The learned-schedule recipe: PES over whole unrolls of a schedule around ``general-v4``
    (only the schedule meta-trained), its sealed test told the horizon, and its starting
    weights stepping exactly like ``general-v4`` with or without the horizon."""
    script = "experiments/learned_schedule.py"
    recipe, config, rule = _pes_recipe(script, run_script, capsys, tmp_path, family="meta-train")
    assert config.rule == "scheduled"
    trained = {n for n, p in rule.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("schedule.") for n in trained)
    assert "--total-steps" in recipe["sealed"](1000)
    _assert_steps_like_the_default(rule, reference="general-v4", total_steps=10)
    _assert_steps_like_the_default(rule, reference="general-v4")


def test_orthogonal_mix_recipe_trains_only_the_mix_around_the_default(
    tmp_path: Path, run_script, capsys
) -> None:
    """The orthogonal-mix recipe: PES over whole unrolls of the mix read-out alone around
    ``general-v6`` (told the horizon), its starting weights stepping exactly like it."""
    script = "experiments/orthogonal_mix.py"
    recipe, config, rule = _pes_recipe(script, run_script, capsys, tmp_path, family="meta-train")
    assert config.rule == "scheduled"
    trained = [n for n, p in rule.named_parameters() if p.requires_grad]
    assert trained == ["base.mix_weight", "base.mix_bias"]
    assert "--total-steps" in recipe["validation_command"](100)
    assert "learned,learned-zeroed" in recipe["validation_command"](100)
    _assert_steps_like_the_default(rule, reference="general-v6", total_steps=10)
    _assert_steps_like_the_default(rule, reference="general-v6")
    # the same run on the group with label noise: its own folder and committed checkpoint
    from learned_opt.cli import build_parser, config_from_args

    assert run_script(script, "--dry-run", "--family", "meta-train-noisy") == 0
    printed = capsys.readouterr().out
    noisy = recipe["meta_train_command"]("meta-train-noisy")
    assert shlex.join(noisy) in printed and "orthogonal-mix-noisy-100" in printed
    noisy_config = config_from_args(build_parser().parse_args(noisy))
    assert noisy_config.family == "meta-train-noisy"
    assert {**noisy_config.to_dict(), "family": "meta-train", "ckpt_dir": None, "log_dir": None,
            "export": None, "init_weights": None} == {**config.to_dict(), "ckpt_dir": None,
            "log_dir": None, "export": None, "init_weights": None}  # fmt: skip
    _assert_written_by(ROOT / recipe["checkpoint_path"]("meta-train-noisy"), noisy_config)
    # a smaller perturbation scale: a run of its own
    small = recipe["meta_train_command"]("meta-train-noisy", 0.03)
    small_config = config_from_args(build_parser().parse_args(small))
    assert small_config.estimator_kwargs == {"sigma": 0.03, "pairs": 8}
    assert "runs/orthogonal-mix-noisy-sigma0.03/ckpt" in small
    _assert_written_by(ROOT / recipe["checkpoint_path"]("meta-train-noisy", 0.03), small_config)
    assert run_script(script, "--dry-run", "--sigma", "0") == 2


def test_learned_adaptation_recipe_trains_only_the_adaptation_from_nothing(
    tmp_path: Path, run_script, capsys
) -> None:
    """The learned-adaptation recipe: PES over whole unrolls of the controller alone (the
    adaptation learned whole) around ``general-v6``, on the rescaled group with label noise;
    its starting weights step exactly like ``general-v6`` with its adaptation off, told the
    horizon or not; its validation compares the weights with their learned outputs zeroed."""
    from learned_opt.rules import build_rule

    script = "experiments/learned_adaptation.py"
    recipe, config, rule = _pes_recipe(script, run_script, capsys, tmp_path)
    assert config.rule == "scheduled" and config.family_kwargs == {"label_noise": 0.2}
    trained = [n for n, p in rule.named_parameters() if p.requires_grad]
    assert trained and all(n.startswith("base.controller_") for n in trained)
    assert rule.base.settings.lr_adapt_learned
    v6, _ = load_rule(pretrained.path("general-v6"))
    saved = v6.config()
    saved["base_config"] = {**saved["base_config"], "lr_adapt": 0.0}
    off = build_rule(v6.kind, saved)
    off.load_state_dict(v6.state_dict())
    _assert_steps_like_the_default(rule, reference=off)
    validation = runpy.run_path(str(ROOT / "experiments/candidates.py"))["validation_command"]
    command = validation(recipe["RUN"], 100, recipe["VALIDATION"])
    assert "--total-steps" in command and "learned,learned-zeroed" in command


def _changed_from(config, script: str) -> tuple[dict, object, set[str]]:
    """The recipe ``script`` another recipe derives its command from, that command's
    configuration, and the settings in which ``config`` differs from it."""
    from learned_opt.cli import build_parser, config_from_args

    base = runpy.run_path(str(ROOT / script))
    before = config_from_args(build_parser().parse_args(base["META_TRAIN"]))
    return base, before, {k for k, v in vars(config).items() if vars(before)[k] != v}


def _assert_trains_the_defaults_controller_from_it(rule) -> None:
    """``rule`` is ``general-v7`` exactly, and meta-training moves its controller alone."""
    trained = [n for n, p in rule.named_parameters() if p.requires_grad]
    assert trained and all(n.startswith("base.controller_") for n in trained)
    v7, _ = load_rule(pretrained.path("general-v7"))
    assert rule.config() == v7.config()
    for (name, a), b in zip(rule.state_dict().items(), v7.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_learned_adaptation_untold_recipe_continues_the_default_told_and_not(
    tmp_path: Path, run_script, capsys
) -> None:
    """The recipe that meta-trains ``general-v7``'s adaptation further: the learned adaptation's
    own command (same estimator, group, objective) with half of the tasks not told their
    horizon and the selection told and not; it trains the controller alone and starts from
    ``general-v7``'s configuration and weights exactly."""
    script = "experiments/learned_adaptation_untold.py"
    recipe, config, rule = _pes_recipe(script, run_script, capsys, tmp_path)
    assert config.untold_fraction == 0.5 and config.eval_untold
    _, _, differs = _changed_from(config, "experiments/learned_adaptation.py")
    assert differs <= {"untold_fraction", "eval_untold", "time_budget", "init_weights",
                       "log_dir", "ckpt_dir", "export"}, differs  # fmt: skip
    _assert_trains_the_defaults_controller_from_it(rule)
    _assert_steps_like_the_default(rule, reference="general-v7")


def test_learned_adaptation_reweighted_recipe_changes_only_the_groups_member_weights(
    tmp_path: Path, run_script, capsys
) -> None:
    """The recipe that meta-trains ``general-v7``'s adaptation further on a reweighted group:
    the learned adaptation's own command with the attention members weighing more and the
    diabetes regressor less, selected told and not; it trains the controller alone and starts
    from ``general-v7`` exactly."""
    from learned_opt.tasks import make_family

    script = "experiments/learned_adaptation_reweighted.py"
    recipe, config, rule = _pes_recipe(script, run_script, capsys, tmp_path)
    _, before, differs = _changed_from(config, "experiments/learned_adaptation.py")
    assert differs <= {"family_kwargs", "eval_untold", "time_budget", "init_weights",
                       "log_dir", "ckpt_dir", "export"}, differs  # fmt: skip
    assert config.eval_untold and config.untold_fraction == 0.0
    assert config.family_kwargs == {**before.family_kwargs,
                                    "member_weights": recipe["MEMBER_WEIGHTS"]}  # fmt: skip
    family = make_family(config.family, **config.family_kwargs)
    plain = make_family(before.family, **before.family_kwargs)
    changed = [m.name for m, a, b in zip(family.members, family.weights, plain.weights) if a != b]
    assert len(changed) == len(recipe["MEMBER_WEIGHTS"])
    _assert_trains_the_defaults_controller_from_it(rule)


def test_learned_adaptation_annealed_recipe_continues_the_reweighted_run_at_a_decayed_rate(
    tmp_path: Path, run_script, capsys
) -> None:
    """The recipe that continues the reweighted run: its command with a smaller meta-learning
    rate decayed on a cosine over a fixed number of iterations, and nothing else; it starts
    from the reweighted run's latest weights (not its best) and trains the controller alone."""

    script = "experiments/learned_adaptation_annealed.py"
    recipe, config, rule = _pes_recipe(script, run_script, capsys, tmp_path)
    base, before, differs = _changed_from(config, "experiments/learned_adaptation_reweighted.py")
    assert differs == {"meta_lr", "meta_lr_schedule", "iterations", "time_budget",
                       "init_weights"}, differs  # fmt: skip
    assert config.meta_lr < before.meta_lr and config.meta_lr_schedule == "cosine"
    assert config.iterations == recipe["ITERATIONS"] <= 100
    latest, _ = load_rule(ROOT / base["CHECKPOINT"], which="latest")
    best, _ = load_rule(ROOT / base["CHECKPOINT"], which="best")
    trained = [n for n, p in rule.named_parameters() if p.requires_grad]
    assert trained and all(n.startswith("base.controller_") for n in trained)
    assert rule.config() == latest.config()
    for (name, a), b in zip(rule.state_dict().items(), latest.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert any(
        not torch.equal(a, b)
        for a, b in zip(latest.state_dict().values(), best.state_dict().values())
    )


def test_learned_adaptation_balanced_recipe_is_the_reweighted_one_decayed_and_balanced(
    tmp_path: Path, run_script, capsys
) -> None:
    """The recipe that reruns the reweighted one from ``general-v7``: its command with the
    meta-learning rate decayed on a cosine over a fixed number of iterations and the selection
    on 3 held-out tasks of each validation member, and nothing else; it trains the controller
    alone from ``general-v7`` exactly."""
    from learned_opt.tasks import make_family

    script = "experiments/learned_adaptation_balanced.py"
    recipe, config, rule = _pes_recipe(script, run_script, capsys, tmp_path)
    _, before, differs = _changed_from(config, "experiments/learned_adaptation_reweighted.py")
    assert differs == {"meta_lr_schedule", "iterations", "time_budget", "eval_tasks",
                       "eval_balanced", "init_weights"}, differs  # fmt: skip
    members = len(make_family("validation").members)
    assert config.eval_balanced and config.eval_tasks % members == 0
    assert config.meta_lr_schedule == "cosine" and config.meta_lr == before.meta_lr
    _assert_trains_the_defaults_controller_from_it(rule)


@pytest.mark.parametrize(
    ("script", "setting", "trained", "start"),
    [("experiments/learned_adaptation_size.py", "controller_size",
      ["base.controller_size_linear", "base.controller_size_w"], None),
     ("experiments/learned_direction.py", "direction_correction",
      ["base.correction_bias", "base.correction_weight"], "general-v7")],
)  # fmt: skip
def test_a_new_part_recipe_trains_that_part_alone_on_the_untold_recipes_command(
    tmp_path: Path, run_script, capsys, script: str, setting: str, trained: list, start
) -> None:
    """The recipes that add a part at zero to earlier weights (each tensor's size as an input of
    the learned adaptation; a learned turn of the direction): the untold recipe's command on the
    new part's weights alone, and nothing else; each starts from its weights (the
    learned-schedule candidate's best; ``general-v7``) step for step, told the horizon and
    not."""
    from learned_opt.outer.factory import build_learner

    recipe, config, rule = _pes_recipe(script, run_script, capsys, tmp_path)
    _, _, differs = _changed_from(config, "experiments/learned_adaptation_untold.py")
    assert differs == {"train_only", "time_budget", "init_weights"}, differs
    assert getattr(rule.base.settings, setting)
    learner = build_learner(dataclasses.replace(config, init_weights=str(tmp_path / "init.pt")))
    assert sorted(n for n, p in learner.rule.named_parameters() if p.requires_grad) == trained
    if start is None:  # the recipe's own starting checkpoint, its best weights
        start, _ = load_rule(ROOT / recipe["START"], which="best")
    _assert_steps_like_the_default(rule, reference=start)
    told = {"total_steps": 20}
    _assert_steps_like_the_default(rule, reference=start, reference_options=told, **told)


def test_learned_warmup_decay_recipe_starts_without_any_schedule_told_or_not(
    tmp_path: Path, run_script, capsys
) -> None:
    """The learned warm-up and decay recipe: PES over whole unrolls, half the tasks not told
    their horizon, of the learned schedule's output layer alone around ``general-v7``; its starting
    weights step exactly like ``general-v7`` not told the horizon, whether told or not (the
    hand-designed schedule is gone, the learned one is at zero)."""
    script = "experiments/learned_warmup_decay.py"
    recipe, config, rule = _pes_recipe(script, run_script, capsys, tmp_path)
    from learned_opt.outer.factory import build_learner

    assert config.rule == "scheduled" and config.untold_fraction == 0.5
    learner = build_learner(dataclasses.replace(config, init_weights=str(tmp_path / "init.pt")))
    trained = [n for n, p in learner.rule.named_parameters() if p.requires_grad]
    assert trained == ["schedule.2.weight", "schedule.2.bias"]
    assert (rule.warmup, rule.tail, rule.unknown_horizon) == (0.0, 0.0, "learned")
    for options in ({}, {"total_steps": 50}):
        _assert_steps_like_the_default(rule, reference="general-v7", **options)


def test_learned_basis_schedule_recipe_trains_three_weights_from_no_schedule(
    tmp_path: Path, run_script, capsys
) -> None:
    """The basis-schedule recipe: the learned warm-up and decay recipe's meta-training (PES over
    whole unrolls, half the tasks not told their horizon) of the schedule's linear path alone
    (three weights), 8 tasks of 4 pairs; its start steps exactly like ``general-v7`` not told
    the horizon, told or not."""
    script = "experiments/learned_basis_schedule.py"
    recipe, config, rule = _pes_recipe(script, run_script, capsys, tmp_path)
    from learned_opt.outer.factory import build_learner

    assert config.rule == "scheduled" and config.untold_fraction == 0.5
    assert config.meta_batch == 8 and config.estimator_kwargs == {"sigma": 0.1, "pairs": 4}
    learner = build_learner(dataclasses.replace(config, init_weights=str(tmp_path / "init.pt")))
    trained = [n for n, p in learner.rule.named_parameters() if p.requires_grad]
    assert trained == ["basis.weight"]
    assert (rule.warmup, rule.tail, rule.unknown_horizon) == (0.0, 0.0, "learned")
    for options in ({}, {"total_steps": 50}):
        _assert_steps_like_the_default(rule, reference="general-v7", **options)


@pytest.mark.parametrize(
    ("script", "sigma"),
    [("experiments/learned_late_decay.py", 0.1),
     ("experiments/learned_late_decay_smoothed.py", 0.5)],
)  # fmt: skip
def test_learned_late_decay_recipe_adds_a_late_decay_to_the_basis_schedule(
    script: str, sigma: float, tmp_path: Path, run_script, capsys
) -> None:
    """The late-decay recipes: the basis-schedule recipe's meta-training (the linear path
    alone, now four weights: one a decay over the last 20% of a told run; perturbations of
    ``sigma``) from a start that steps exactly like ``general-v7`` not told the horizon, told
    or not."""
    recipe, config, rule = _pes_recipe(script, run_script, capsys, tmp_path)
    from learned_opt.outer.factory import build_learner

    basis = runpy.run_path(str(ROOT / "experiments/learned_basis_schedule.py"))
    shared = [a for a in recipe["META_TRAIN"] if recipe["NAME"] not in a]
    expected = [a for a in basis["META_TRAIN"] if "learned-basis-schedule" not in a]
    pes = expected.index("--estimator-kwargs") + 1
    assert json.loads(expected[pes])["sigma"] == 0.1
    expected[pes] = json.dumps({**json.loads(expected[pes]), "sigma": sigma})
    assert shared == expected and config.estimator_kwargs["sigma"] == sigma
    assert config.meta_loss_floor == 0.05 and config.untold_fraction == 0.5
    learner = build_learner(dataclasses.replace(config, init_weights=str(tmp_path / "init.pt")))
    trained = [n for n, p in learner.rule.named_parameters() if p.requires_grad]
    assert trained == ["basis.weight"] and learner.rule.basis.weight.shape == (1, 4)
    assert rule.basis_tails == (0.2,) and (rule.warmup, rule.tail) == (0.0, 0.0)
    for options in ({}, {"total_steps": 50}):
        _assert_steps_like_the_default(rule, reference="general-v7", **options)


def test_basis_schedule_grid_scores_fixed_weights_beside_the_hand_designed_schedule(
    tmp_path: Path, run_script
) -> None:
    """The grid scores ``general-v7`` and fixed basis weights on held-out tasks as the
    meta-trainer does: on a 3-step run ``general-v7``'s warm-up and decay are the identity, so
    it scores as the weights at zero; a decay to the end scores differently."""
    args = ["--steps", "3", "--tasks", "1", "--procs", "1", "--grid", "[[0, 0, 0], [2, 0, 0]]"]
    assert run_script("experiments/basis_schedule_grid.py", *args, "--out", str(tmp_path)) == 0
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert [r["weights"] for r in records] == [None, [0, 0, 0], [2, 0, 0]]
    v7, zero, decay = (r["metric"] for r in records)
    assert v7 == zero and decay != zero and math.isfinite(decay)
    assert "`general-v7` (hand-designed)" in (tmp_path / "table.md").read_text()
    # the bound reaches the rule: the same decay bounded tighter scores differently
    bounded = tmp_path / "bounded"
    assert run_script("experiments/basis_schedule_grid.py", *args, "--bound", "0.1",
                      "--out", str(bounded)) == 0  # fmt: skip
    rows = [json.loads(line) for line in (bounded / "records.jsonl").read_text().splitlines()]
    assert rows[2]["bound"] == 0.1 and rows[2]["metric"] != decay and rows[1]["metric"] == zero
    # a late-decay log-schedule: one more weight per tail; a grid point without it is refused
    tail = ["--tails", "[0.2]", "--grid", "[[0, 0, 0, 1]]", "--out", str(tmp_path / "tail")]
    assert run_script("experiments/basis_schedule_grid.py", *args[:6], *tail) == 0
    assert "decay over the last 0.2 T" in (tmp_path / "tail" / "table.md").read_text()
    refused = run_script(
        "experiments/basis_schedule_grid.py", *args, "--tails", "[0.2]", "--out", "x"
    )
    assert refused == 2 and not Path("x").exists()


@pytest.mark.parametrize(
    ("script", "worse"),
    [("experiments/learned_adaptation.py", "horizon-decay"),
     ("experiments/learned_warmup_decay.py", "orthogonal-direction"),
     ("experiments/learned_basis_schedule.py", "orthogonal-direction"),
     ("experiments/learned_late_decay.py", "orthogonal-direction"),
     ("experiments/learned_late_decay_smoothed.py", "orthogonal-direction"),
     ("experiments/learned_adaptation_untold.py", "orthogonal-direction"),
     ("experiments/learned_adaptation_reweighted.py", "orthogonal-direction"),
     ("experiments/learned_adaptation_annealed.py", "orthogonal-direction"),
     ("experiments/learned_adaptation_balanced.py", "orthogonal-direction"),
     ("experiments/learned_adaptation_size.py", "orthogonal-direction"),
     ("experiments/learned_direction.py", "orthogonal-direction")],
)  # fmt: skip
def test_a_learned_part_ships_only_weights_at_most_the_defaults_sealed_figures(
    tmp_path: Path, script: str, worse: str
) -> None:
    """The ship step writes the committed checkpoint's best weights with their budget and
    sealed figures (told the horizon and not) beside those of the weights they start from, and
    refuses weights whose sealed geometric mean is above theirs (``worse``: earlier weights'
    runs)."""
    recipe = runpy.run_path(str(ROOT / script))
    checkpoint = ROOT / recipe["CHECKPOINT"]
    if not checkpoint.is_file():
        pytest.skip("no committed checkpoint of the run")
    committed = ROOT / candidates_sealed()

    def sealed_runs(told: str, free: str) -> Path:
        sealed = tmp_path / f"sealed-{told}"
        for h in (100, 1000):
            for name, source in (
                (recipe["NAME"], told), (recipe["BASE_SEALED"], recipe["BASE_SEALED"]),
                (f"{recipe['NAME']}-horizon-free", free),
                (recipe["BASE_SEALED_FREE"], recipe["BASE_SEALED_FREE"]),
            ):  # fmt: skip
                shutil.copytree(committed / f"{source}-{h}", sealed / f"{name}-{h}")
        return sealed

    ship = recipe["ship"]
    # general-v6's own runs stand in for the candidate's: not above, so it ships
    sealed = sealed_runs(recipe["BASE_SEALED"], recipe["BASE_SEALED_FREE"])
    meta = ship(tmp_path / "package", sealed_dir=sealed, checkpoint=checkpoint)
    rule, saved = load_rule(tmp_path / "package" / f"{recipe['SHIPPED']}.pt")
    assert saved == meta and rule.base.settings.lr_adapt_learned
    best, _ = load_rule(checkpoint, which="best")
    for a, b in zip(rule.parameters(), best.parameters(), strict=True):
        assert torch.equal(a, b)
    state = torch.load(checkpoint, weights_only=True)
    assert meta["budget"]["iterations"] == state["iteration"]
    assert meta["figures"]["default_candidate"] and meta["figures"]["horizon_free"]
    # earlier weights' runs (worse than the base's) are refused
    refused = sealed_runs(worse, recipe["BASE_SEALED_FREE"])
    with pytest.raises(ValueError, match="not shipping"):
        ship(tmp_path / "refused", sealed_dir=refused, checkpoint=checkpoint)
    assert not (tmp_path / "refused").exists()


def test_learned_schedule_ships_the_committed_best_weights_horizon_free(tmp_path: Path) -> None:
    """The ship step writes the committed checkpoint's best weights (the ones sealed-tested)
    with ``unknown_horizon="base"`` (``general-v4`` step for step without ``total_steps``), its
    budget, validation and sealed figures, and whether they are at most ``general-v4``'s."""
    from learned_opt.rules import ScheduledRule

    recipe = runpy.run_path(str(ROOT / "experiments/learned_schedule.py"))
    checkpoint = ROOT / recipe["CHECKPOINT"]
    if not checkpoint.is_file():
        pytest.skip("no committed checkpoint of the run")
    sealed = tmp_path / "sealed"
    for h in (100, 1000):  # general-v4's own runs stand in for the candidate's
        for name in ("learned-schedule", recipe["BASE_SEALED"]):
            source = ROOT / candidates_sealed() / f"{recipe['BASE_SEALED']}-{h}"
            shutil.copytree(source, sealed / f"{name}-{h}")
    validation = tmp_path / "validation"
    write_jsonl(validation / "records.jsonl", [
        {"rule": r, "steps": h, "metric": 0.5, "seconds": 1.0}
        for h in (100, 1000) for r in ("general-v4", "learned schedule")
    ])  # fmt: skip
    ship = recipe["ship"]
    ship.__globals__["VALIDATION"] = validation
    meta = ship(tmp_path / "package", sealed_dir=sealed, checkpoint=checkpoint)
    rule, saved = load_rule(tmp_path / "package" / f"{recipe['NAME']}.pt")
    assert saved == meta and isinstance(rule, ScheduledRule)
    assert rule.unknown_horizon == "base"
    best, _ = load_rule(checkpoint, which="best")
    for a, b in zip(rule.parameters(), best.parameters(), strict=True):
        assert torch.equal(a, b)
    _assert_steps_like_the_default(rule, reference="general-v4")
    state = torch.load(checkpoint, weights_only=True)
    assert meta["budget"]["iterations"] == state["iteration"]
    assert meta["checkpoint"]["best_iteration"] == state["best_iteration"]
    assert meta["validation"]["by_steps"]["1000"] == {"general-v4": 0.5, "learned schedule": 0.5}
    assert meta["figures"]["default_candidate"]  # the same figures as general-v4's
    assert set(meta["figures"]["by_steps"]) == {"100", "1000"}


@pytest.mark.parametrize("script", ["horizon_decay.py", "warmup_decay.py"])
def test_horizon_decay_writes_the_decay_with_the_lowest_validation_metric(
    tmp_path: Path, script: str
) -> None:
    """A hand-designed decay's weights: ``general-v4`` step for step without the horizon, the
    chosen warm-up and tail with it; the chosen decay has the lowest mean log metric of the
    recipe's committed validation records, which compare every shape the recipe names."""
    from learned_opt.report import read_jsonl

    recipe = runpy.run_path(str(ROOT / "experiments" / script))
    settings = recipe["RECIPE"]
    recipe["write_weights"](tmp_path / "weights.pt")
    rule, _ = load_rule(tmp_path / "weights.pt")
    assert {k: rule.config()[k] for k in recipe["CHOSEN"]} == recipe["CHOSEN"]
    _assert_steps_like_the_default(rule, reference="general-v4")
    records = read_jsonl(ROOT / settings.validation / "records.jsonl")
    assert {(r["decay"], r["steps"]) for r in records} == {
        (d, h) for d in {"none", *settings.decays} for h in (100, 1000)
    }
    score: dict[str, float] = {}
    for r in records:
        score[r["decay"]] = score.get(r["decay"], 0.0) + math.log(r["metric"])
    best = min(score, key=score.get)
    decay = recipe["DECAYS"][best]
    warmup, tail = recipe["CHOSEN"]["warmup"], recipe["CHOSEN"]["tail"]
    for total in (100, 1000):  # the chosen row is the shape the weights apply
        for t in (1, total // 50, total // 10, total // 2, total - total // 10, total):
            expected = min(1.0, t / math.ceil(warmup * total)) * min(
                1.0, (total - t + 1) / (tail * total)
            )
            assert decay(t, total) == pytest.approx(expected)


def test_horizon_decay_validation_resumes_from_its_records(tmp_path: Path, capsys) -> None:
    """``validate --resume`` keeps the records in ``--out`` and runs only what they lack (here
    nothing: the table is written from the records alone)."""
    from learned_opt.report import read_jsonl, write_jsonl

    recipe = runpy.run_path(str(ROOT / "experiments/horizon_decay.py"))
    out = tmp_path / "validation"
    names = ["none", "5% warm-up"]
    write_jsonl(out / "records.jsonl", [
        {"decay": d, "steps": h, "losses": [1.0], "metric": m, "seconds": 0.0}
        for d, m in zip(names, (0.5, 0.4)) for h in (100, 1000)
    ])  # fmt: skip
    argv = ["--decays", ";".join(names), "--out", str(out), "--resume", "--procs", "1"]
    assert recipe["main"](argv) == 0
    assert "| 5% warm-up | 0.4000 | 0.4000 | 0.800 |" in (out / "table.md").read_text()
    assert len(read_jsonl(out / "records.jsonl")) == 4
    with pytest.raises(SystemExit):
        recipe["main"](["--decays", "no such decay", "--out", str(out)])
    assert "unknown decays" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("script", "replaced"),
    [("horizon_decay.py", "general-v4"), ("warmup_decay.py", "general-v5")],
)
def test_horizon_decay_ships_general_v4_with_the_chosen_decay(
    tmp_path: Path, script: str, replaced: str
) -> None:
    """The ship step writes the chosen decay around ``general-v4`` (the same steps without the
    horizon), the validation figures that chose it, the sealed figures told the horizon against
    those of the weights it replaces and whether they are at most those at both horizons."""
    recipe = runpy.run_path(str(ROOT / "experiments" / script))
    settings = recipe["RECIPE"]
    sealed = ROOT / candidates_sealed()
    runs = [sealed / f"{settings.sealed_name}-{h}" / "summary.jsonl" for h in (100, 1000)]
    if not all(run.is_file() for run in runs):
        pytest.skip("no committed sealed runs of the candidate")
    meta = recipe["ship"](tmp_path / "package", sealed=sealed)
    rule, saved = load_rule(tmp_path / "package" / f"{recipe['NAME']}.pt")
    assert saved == meta and rule.unknown_horizon == "base"
    assert (rule.warmup, rule.tail) == (recipe["CHOSEN"]["warmup"], recipe["CHOSEN"]["tail"])
    _assert_steps_like_the_default(rule, reference="general-v4")
    settings_recorded = meta["derived_from"]["settings"]
    assert settings_recorded["decay"] in settings.decays
    assert settings_recorded["warmup"] == rule.warmup
    validation = meta["derived_from"]["chosen_on_validation"]
    assert set(validation["by_steps"]) == {"100", "1000"}
    assert validation["command"] == f"python experiments/{script} --steps validate"
    at_most = []
    for horizon, entry in meta["figures"]["by_steps"].items():
        assert f"{settings.sealed_name}-{horizon}" in entry["results"]
        assert "--total-steps" in entry["command"]
        before = entry[f"replaced_{replaced}"]
        at_most.append(entry["geometric_mean"] <= before["geometric_mean"])
    assert meta["figures"]["default_candidate"] == all(at_most)


def test_adaptation_drift_recipe_starts_from_the_gain_candidate(
    tmp_path: Path, run_script, capsys
) -> None:
    """The learned-drift recipe: the gain recipe's meta-training in its own run folder, from
    the committed gain run's best weights with a zero drift (which step exactly like them)."""
    script = "experiments/adaptation_drift.py"
    recipe, _, rule = _controller_recipe(script, run_script, capsys, tmp_path)
    gain = runpy.run_path(str(ROOT / "experiments/adaptation_gain.py"))
    assert "runs/adaptation-drift/ckpt" in recipe["META_TRAIN"]
    assert [a.replace("adaptation-drift", "adaptation-gain") for a in recipe["META_TRAIN"]] == (
        gain["META_TRAIN"]
    )
    assert rule.settings.controller_drift > 0
    best, _ = load_rule(ROOT / gain["CHECKPOINT"])  # the checkpoint's best rule
    _assert_steps_like_the_default(rule, reference=best)


@pytest.mark.parametrize(
    ("script", "base", "run"),
    [
        ("experiments/adaptation_rate.py", "general", "runs/adaptation-rate"),
        ("experiments/adam_betas.py", "general-v2", "runs/adam-betas"),
        ("experiments/adaptation_shrink.py", "general-v3", "runs/adaptation-shrink"),
    ],
)
def test_settings_recipe_writes_its_base_with_the_chosen_settings(
    script: str, base: str, run: str, tmp_path: Path, run_script, capsys, monkeypatch
) -> None:
    """A settings recipe (the retuned adaptation, momenta, shrinking): its ``weights`` step
    writes the shipped base's tensors with the chosen settings, and the committed validation
    record (if any) chooses those settings."""
    import math

    from learned_opt.report import read_jsonl

    assert run_script(script, "--dry-run") == 0
    assert f"{run}/weights.pt" in capsys.readouterr().out
    recipe = runpy.run_path(str(ROOT / script))
    chosen = recipe["CHOSEN"]
    assert chosen in recipe["GRID"] and {} in recipe["GRID"]
    recipe["main"].__globals__["RUN"] = tmp_path  # the step's folder, not the repository's
    monkeypatch.chdir(ROOT)
    assert recipe["main"](["--steps", "weights"]) == 0
    path = tmp_path / "weights.pt"
    rule, _ = load_rule(path)
    default, _ = load_rule(pretrained.path(base))
    assert all(getattr(rule.settings, k) == v for k, v in chosen.items())
    for key, value in default.state_dict().items():
        assert torch.equal(rule.state_dict()[key], value)
    records = ROOT / recipe["RESULTS"] / "records.jsonl"
    if records.is_file():
        metric = {(json.dumps(r["setting"]), r["steps"]): r["metric"] for r in read_jsonl(records)}

        def score(setting):
            key = json.dumps(setting)
            return sum(math.log(metric[key, h] / metric["{}", h]) for h in recipe["HORIZONS"])

        assert min(recipe["GRID"], key=score) == chosen


def test_validate_settings_scores_every_setting_and_chooses_the_lowest(tmp_path: Path) -> None:
    """The settings recipes' validation: one record per setting and horizon, a table row per
    setting, and the chosen setting the one of lowest mean log metric."""
    import math
    import sys

    sys.path.insert(0, str(ROOT / "experiments"))
    import candidates

    from learned_opt.report import read_jsonl

    grid = [{}, {"beta2": 0.5}]
    chosen = candidates.validate_settings("general-v2", grid, (2, 3), tmp_path, "caption")
    records = read_jsonl(tmp_path / "records.jsonl")
    assert [(r["setting"], r["steps"]) for r in records] == [(g, h) for h in (2, 3) for g in grid]
    assert all(len(r["losses"]) == 8 and math.isfinite(r["metric"]) for r in records)
    score = {json.dumps(g): sum(math.log(r["metric"]) for r in records if r["setting"] == g)
             for g in grid}  # fmt: skip
    assert json.dumps(chosen) == min(score, key=score.get)
    table = (tmp_path / "table.md").read_text()
    assert table.startswith("caption") and '`{"beta2": 0.5}`' in table


@pytest.mark.parametrize(
    ("script", "replaced", "sealed_name", "replaced_name"),
    [
        ("experiments/adaptation_rate.py", "general", "adaptation-rate", "general"),
        ("experiments/adam_betas.py", "general-v2", "adam-betas", "general-v2-regrouped"),
        ("experiments/adaptation_shrink.py", "general-v3", "adaptation-shrink", "adam-betas"),
    ],
)
def test_settings_recipe_ships_its_weights_with_their_sealed_figures(
    script: str, replaced: str, sealed_name: str, replaced_name: str, tmp_path: Path, run_script
) -> None:
    """A settings recipe's ship step writes the retuned weights with the LSTM's meta-training
    record, the validation figures that chose the settings and the sealed figures of these
    weights and of the weights they replace; it refuses weights whose sealed figures are worse."""
    recipe = runpy.run_path(str(ROOT / script))
    results = ROOT / candidates_sealed()
    if not all((results / f"{sealed_name}-{h}" / "summary.jsonl").is_file() for h in (100, 1000)):
        pytest.skip(f"no committed sealed runs of {sealed_name}")
    package = tmp_path / "package"
    args = ["--steps", "ship", "--ship-to", str(package)]
    assert run_script(script, *args) == 0
    name = recipe["NAME"]
    rule, meta = load_rule(package / f"{name}.pt")
    assert json.loads((package / f"{name}.json").read_text()) == meta
    recipe["main"].__globals__["RUN"] = tmp_path  # the weights step's folder
    assert recipe["main"](["--steps", "weights"]) == 0
    written = tmp_path / "weights.pt"
    for a, b in zip(rule.parameters(), load_rule(written)[0].parameters(), strict=True):
        assert torch.equal(a, b)
    assert rule.settings == load_rule(written)[0].settings
    before = pretrained.metadata(replaced)
    assert meta["command"] == before["command"] and meta["config"] == before["config"]
    assert meta["recipe"] == f"python {script}"
    assert meta["derived_from"]["settings"] == recipe["CHOSEN"]
    base_file = pretrained.path(replaced).read_bytes()
    assert meta["derived_from"]["weights_sha256"] == hashlib.sha256(base_file).hexdigest()
    for horizon, entry in meta["figures"]["by_steps"].items():
        table = (ROOT / entry["results"] / "table.md").read_text()
        assert f"**{entry['geometric_mean']:.3f}**" in table
        assert f"--steps {horizon} " in entry["command"]
        assert entry["geometric_mean"] <= entry[f"replaced_{replaced}"]["geometric_mean"]
        assert entry["ratios"] and max(entry["ratios"].values()) == entry["worst"]

    # swapped results (the replaced weights' as the candidate's): refused, nothing written
    sealed = tmp_path / "sealed"
    for horizon in recipe["HORIZONS"]:
        mine, before = f"{sealed_name}-{horizon}", f"{replaced_name}-{horizon}"
        shutil.copytree(results / mine, sealed / before)
        shutil.copytree(results / before, sealed / mine)
    refused = tmp_path / "refused"
    with pytest.raises(ValueError, match="not shipping"):
        recipe["ship"](refused, sealed=sealed)
    assert not refused.exists()


def candidates_sealed() -> Path:
    """Where the sealed test's runs are committed (the recipes' ``candidates.SEALED``)."""
    return Path(runpy.run_path(str(ROOT / "experiments/candidates.py"))["SEALED"])


def test_adaptation_rate_gain_recipe_starts_from_the_retuned_candidate(
    tmp_path: Path, run_script, capsys
) -> None:
    """The gain on the retuned adaptation: the gain recipe's meta-training in its own folder,
    from the retuned candidate with a zero controller (which steps exactly like it)."""
    script = "experiments/adaptation_rate_gain.py"
    recipe, _, rule = _controller_recipe(script, run_script, capsys, tmp_path)
    gain = runpy.run_path(str(ROOT / "experiments/adaptation_gain.py"))
    assert "runs/adaptation-rate-gain/ckpt" in recipe["META_TRAIN"]
    renamed = [a.replace("adaptation-rate-gain", "adaptation-gain") for a in recipe["META_TRAIN"]]
    assert renamed == gain["META_TRAIN"]
    retuned = tmp_path / "retuned.pt"
    rate = runpy.run_path(str(ROOT / "experiments/adaptation_rate.py"))
    candidates = runpy.run_path(str(ROOT / "experiments/candidates.py"))
    candidates["write_settings_weights"](retuned, rate["REPLACES"], rate["CHOSEN"])
    _assert_steps_like_the_default(rule, reference=load_rule(retuned)[0])


def _size_recipe() -> dict:
    return runpy.run_path(str(ROOT / "experiments/size_scaled_step.py"))


@pytest.mark.parametrize(
    ("script", "base", "run"),
    [
        ("experiments/size_scaled_step.py", "general-v2", "runs/size-scaled-step"),
        ("experiments/size_scaled_default.py", "general-v4", "runs/size-scaled-default"),
    ],
)
def test_size_scaled_recipe_writes_its_base_with_the_chosen_reference(
    script: str, base: str, run: str, tmp_path: Path, run_script, capsys
) -> None:
    """Its weights are the base's tensors with ``lr_size_ref`` = CHOSEN, and the committed
    validation record (if any) chooses CHOSEN."""
    import math

    from learned_opt.report import read_jsonl

    assert run_script(script, "--dry-run") == 0
    assert f"{run}/weights.pt" in capsys.readouterr().out
    recipe = runpy.run_path(str(ROOT / script))
    chosen = recipe["CHOSEN"]
    assert chosen in recipe["GRID"] and 0.0 in recipe["GRID"]
    recipe["write_weights"](tmp_path / "weights.pt")
    rule, _ = load_rule(tmp_path / "weights.pt")
    replaced, _ = load_rule(pretrained.path(base))
    assert rule.settings == replaced.settings.replace(lr_size_ref=chosen)
    for key, value in replaced.state_dict().items():
        assert torch.equal(rule.state_dict()[key], value)
    records = ROOT / recipe["RESULTS"] / "records.jsonl"
    if records.is_file():
        rows = read_jsonl(records)

        def score(ref: float) -> float:
            total = 0.0
            for h in recipe["HORIZONS"]:
                mine = [r["metric"][str(h)] for r in rows if r["group"] == "wide"
                        and r["lr_size_ref"] == ref]  # fmt: skip
                base = [r["metric"][str(h)] for r in rows if r["group"] == "wide"
                        and r["lr_size_ref"] == 0.0]  # fmt: skip
                total += sum(map(math.log, mine)) - sum(map(math.log, base))
            return total

        assert min(recipe["GRID"], key=score) == chosen


def test_size_scaled_step_validation_chooses_the_lowest_metric(tmp_path: Path) -> None:
    """The validate step on tiny stand-ins: every (setting, task, seed) is run, the table lists
    every setting, and the choice is the setting with the lowest mean log metric."""
    from learned_opt.report import read_jsonl
    from learned_opt.tasks.nets import SourceMLPFamily

    recipe = _size_recipe()
    validate = recipe["validate"]
    validate.__globals__.update(
        WIDE=lambda: {"tiny": SourceMLPFamily("friedman3", "val", (32,), (1,), ("relu",), (16,))},
        GRID=(0.0, 64.0), SEEDS=(0,), HORIZONS=(10, 20),
        _validation_runs=lambda ref, base: [{"group": "validation", "lr_size_ref": ref, "steps": h,
                                       "metric": 1.0, "seconds": 0.0} for h in (10, 20)],
    )  # fmt: skip
    chosen = validate(tmp_path, 1)
    rows = [r for r in read_jsonl(tmp_path / "records.jsonl") if r["group"] == "wide"]
    assert sorted(r["lr_size_ref"] for r in rows) == [0.0, 64.0]
    metric = {r["lr_size_ref"]: r["metric"]["10"] * r["metric"]["20"] for r in rows}
    assert metric[0.0] != metric[64.0] and chosen == min(metric, key=metric.get)
    table = (tmp_path / "table.md").read_text()
    assert "| 64 " in table and table.startswith("`general-v2` with")


def test_size_scaled_step_ships_its_weights_with_their_sealed_figures(tmp_path: Path) -> None:
    """The ship step writes ``general-v2``'s tensors with the chosen reference, the validation
    figures that chose it, the sealed figures of both and whether the candidate's are at most
    the default's at both horizons; where no sealed tensor is above the reference it takes
    ``general-v2``'s sealed figures (the same steps)."""
    recipe = _size_recipe()
    sealed = ROOT / recipe["SEALED"]
    if not (sealed / "size-scaled-step-1000" / "summary.jsonl").is_file():
        pytest.skip("no sealed run of the candidate committed")
    ship = recipe["ship"]
    meta = ship(tmp_path / "package", sealed=sealed)
    rule, saved = load_rule(tmp_path / "package" / f"{recipe['NAME']}.pt")
    assert saved == meta and rule.settings.lr_size_ref == recipe["CHOSEN"]
    assert meta["derived_from"]["weights"] == "general-v2"
    assert meta["derived_from"]["settings"] == {"lr_size_ref": recipe["CHOSEN"]}
    largest = recipe["largest_sealed_tensor"]()
    assert largest > recipe["CHOSEN"]
    at_most = []
    for horizon, entry in meta["figures"]["by_steps"].items():
        assert f"size-scaled-step-{horizon}" in entry["results"] and "same_steps_as" not in entry
        default = entry["general-v2"]["geometric_mean"]
        at_most.append(entry["geometric_mean"] <= default)
        assert entry["at_most_general-v2"] == at_most[-1]
    assert meta["figures"]["default_candidate"] == all(at_most)
    # a reference above every sealed tensor: the same steps there, so general-v2's figures
    ship.__globals__["CHOSEN"] = float(largest)
    meta = ship(tmp_path / "same", sealed=sealed)
    for entry in meta["figures"]["by_steps"].values():
        assert entry["same_steps_as"] == "general-v2"
        assert entry["geometric_mean"] == entry["general-v2"]["geometric_mean"]
    assert meta["figures"]["default_candidate"]


def test_size_scaled_default_ships_general_v4_with_the_chosen_reference(tmp_path: Path) -> None:
    """The candidate's ship step writes ``general-v4``'s tensors with the chosen reference, the
    wide validation figures that chose it, the sealed figures of both and whether its sealed
    geometric mean is at most ``general-v4``'s at both horizons."""
    recipe = runpy.run_path(str(ROOT / "experiments/size_scaled_default.py"))
    results = ROOT / candidates_sealed()
    if not all((results / f"size-scaled-default-{h}" / "summary.jsonl").is_file()
               for h in (100, 1000)):  # fmt: skip
        pytest.skip("no committed sealed runs of the candidate")
    meta = recipe["ship"](tmp_path / "package")
    rule, saved = load_rule(tmp_path / "package" / f"{recipe['NAME']}.pt")
    assert saved == meta and rule.settings.lr_size_ref == recipe["CHOSEN"]
    base, _ = load_rule(pretrained.path("general-v4"))
    assert rule.settings == base.settings.replace(lr_size_ref=recipe["CHOSEN"])
    for a, b in zip(rule.parameters(), base.parameters(), strict=True):
        assert torch.equal(a, b)
    assert meta["derived_from"]["settings"] == {"lr_size_ref": recipe["CHOSEN"]}
    base_file = pretrained.path("general-v4").read_bytes()
    assert meta["derived_from"]["weights_sha256"] == hashlib.sha256(base_file).hexdigest()
    validation = meta["derived_from"]["chosen_on_validation"]
    assert validation["command"] == "python experiments/size_scaled_default.py --steps validate"
    assert set(validation["by_steps"]) == {"100", "1000"}
    assert all(set(entry) == {"chosen", "general-v4"} for entry in validation["by_steps"].values())
    at_most = []
    for horizon, entry in meta["figures"]["by_steps"].items():
        assert f"size-scaled-default-{horizon}" in entry["results"]
        before = entry["replaced_general-v4"]
        assert f"adaptation-shrink-{horizon}" in before["results"]
        at_most.append(entry["geometric_mean"] <= before["geometric_mean"])
    assert meta["figures"]["default_candidate"] == all(at_most)


def test_orthogonal_direction_writes_general_v5_with_muons_direction_for_matrices(
    tmp_path: Path,
) -> None:
    """The candidate is ``general-v5`` (weights, warm-up and decay) with the chosen base
    settings: a vector steps as under ``general-v5``, a matrix does not."""
    recipe = runpy.run_path(str(ROOT / "experiments/orthogonal_direction.py"))
    recipe["write_weights"](tmp_path / "weights.pt")
    rule, _ = load_rule(tmp_path / "weights.pt")
    base, _ = load_rule(pretrained.path("general-v5"))
    settings = recipe["VARIANTS"][recipe["CHOSEN"]]
    assert settings["orthogonal"] and rule.reads_shape
    assert rule.config() == {
        **base.config(),
        "base_config": {**base.config()["base_config"], **settings},
    }
    torch.manual_seed(0)
    grads = [torch.randn(8, 5) for _ in range(4)]
    final = {}
    for name, weights in (("candidate", rule), ("general-v5", base)):
        w = torch.nn.Parameter(torch.zeros(8, 5))
        b = torch.nn.Parameter(torch.zeros(5))
        opt = LSTMOptimizer([w, b], weights=weights, total_steps=20)
        for g in grads:
            w.grad, b.grad = g.clone(), g[0].clone()
            opt.step()
        final[name] = (w.detach().clone(), b.detach().clone())
    assert torch.equal(final["candidate"][1], final["general-v5"][1])
    assert not torch.allclose(final["candidate"][0], final["general-v5"][0], atol=1e-4)


def test_orthogonal_direction_chose_the_lowest_validation_ratio() -> None:
    """The committed validation runs compare every variant (the reference beside tuned Muon),
    and :data:`CHOSEN` has the lowest mean log ratio to tuned Adam over both horizons."""
    recipe = runpy.run_path(str(ROOT / "experiments/orthogonal_direction.py"))
    results = ROOT / recipe["RESULTS"]
    if not (results / "records.jsonl").is_file():
        pytest.skip("no committed validation runs")
    found = recipe["figures"](results)
    assert set(found) == set(recipe["VARIANTS"])
    assert {"muon", "muon-cosine", "learned"} <= set(found["general-v5"][1000])
    assert recipe["choose"](found) == recipe["CHOSEN"]


def test_orthogonal_direction_ships_with_its_sealed_figures(tmp_path: Path) -> None:
    recipe = runpy.run_path(str(ROOT / "experiments/orthogonal_direction.py"))
    sealed = ROOT / candidates_sealed()
    runs = [sealed / f"{recipe['SEALED_NAME']}-{h}" / "summary.jsonl" for h in (100, 1000)]
    if not all(run.is_file() for run in runs):
        pytest.skip("no committed sealed runs of the candidate")
    meta = recipe["ship"](tmp_path / "package", sealed=sealed)
    rule, saved = load_rule(tmp_path / "package" / f"{recipe['NAME']}.pt")
    assert saved == meta and rule.base.settings.orthogonal
    assert meta["derived_from"]["weights"] == "general-v5"
    at_most = []
    for horizon, entry in meta["figures"]["by_steps"].items():
        assert f"orthogonal-direction-{horizon}" in entry["results"]
        assert "--total-steps" in entry["command"]
        at_most.append(entry["geometric_mean"] <= entry["replaced_general-v5"]["geometric_mean"])
    assert meta["figures"]["default_candidate"] == all(at_most)


def test_lean_default_ships_general_v7_without_its_lstm_by_its_sealed_figures(
    tmp_path: Path,
) -> None:
    """The lean candidate's ship step writes ``general-v7``'s controller and schedule without
    the LSTM, with the validation figures that let it be sealed, its sealed figures beside
    ``general-v7``'s told and not, and the name the rule gives it: the default's only if it is
    at most ``general-v7``'s in all four runs."""
    recipe = runpy.run_path(str(ROOT / "experiments/lean_default.py"))
    sealed = ROOT / candidates_sealed()
    names = [f"lean-default{free}-{h}" for free in ("", "-horizon-free") for h in (100, 1000)]
    if not all((sealed / n / "summary.jsonl").is_file() for n in names):
        pytest.skip("no committed sealed runs of the candidate")
    meta = recipe["ship"](tmp_path / "package", sealed=sealed)
    default = (
        meta["figures"]["default_candidate"]
        and meta["figures"]["horizon_free"]["default_candidate"]
    )
    name = recipe["DEFAULT_NAME"] if default else recipe["SIDE_NAME"]
    rule, saved = load_rule(tmp_path / "package" / f"{name}.pt")
    assert saved == meta and not rule.unwrapped.lstm
    base, _ = load_rule(pretrained.path("general-v7"))
    kept = dict(rule.named_parameters())
    for key, value in base.named_parameters():
        if "controller" in key or key.startswith("schedule"):
            assert torch.equal(kept.pop(key), value), key
    assert not kept  # nothing else: no LSTM, no read-out
    assert meta["derived_from"]["settings"] == {"lstm": False}
    validation = meta["derived_from"]["chosen_on_validation"]
    assert validation["sealed_by_the_rule"] and len(validation["runs"]) == 4
    for figures in (meta["figures"], meta["figures"]["horizon_free"]):
        for entry in figures["by_steps"].values():
            assert (
                entry["replaced_general-v7"]["results"]
                .split("/")[-1]
                .startswith("learned-adaptation")
            )


def test_a_refused_ship_step_exits_with_a_message_and_writes_nothing(
    tmp_path: Path, run_script, capsys
) -> None:
    """The reweighted candidate's sealed figures are above ``general-v7``'s told: its ship step
    exits 2 with the reason, not a traceback, and writes no weights."""
    script = "experiments/learned_adaptation_reweighted.py"
    assert run_script(script, "--steps", "ship", "--ship-to", str(tmp_path)) == 2
    assert "not shipped" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
