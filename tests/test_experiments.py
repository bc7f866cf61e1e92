"""Experiment scripts run end to end in a --smoke mode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from learned_opt import LSTMRule, pretrained
from learned_opt.checkpoint import load_rule, save_rule
from learned_opt.report import write_jsonl


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


def test_mnist_paper_ships_weights_with_their_benchmark_figures(tmp_path: Path, run_script) -> None:
    run_dir, bench, package = tmp_path / "run", tmp_path / "bench", tmp_path / "package"
    run_dir.mkdir()
    package.mkdir()
    # the smoke benchmark evaluates the packaged "quadratic" weights: ship a copy of those
    shutil.copyfile(pretrained.path("quadratic"), run_dir / "paper-mnist.pt")
    (run_dir / "paper-mnist.json").write_text("{}")
    assert run_script("benchmarks/mnist_paper.py", "--smoke", "--out", str(bench)) == 0
    ship = ["--out", str(run_dir), "--ship", "--benchmark", str(bench), "--ship-to", str(package)]
    assert run_script("experiments/mnist_paper.py", *ship) == 0
    rule, meta = load_rule(package / "paper-mnist.pt")
    original, _ = load_rule(pretrained.path("quadratic"))
    for a, b in zip(rule.parameters(), original.parameters()):
        assert torch.equal(a, b)  # only the metadata changed
    figures = meta["benchmark"]["figures"]["smoke"]
    assert figures["ratio_vs_adam"] == round(figures["lstm"] / figures["adam_tuned"], 3)
    assert "benchmarks/mnist_paper.py" in meta["benchmark"]["command"]
    assert json.loads((package / "paper-mnist.json").read_text()) == meta
    # weights other than the benchmarked ones are refused, and nothing is written
    (package / "paper-mnist.pt").unlink()
    torch.save({"other": torch.zeros(1)}, run_dir / "paper-mnist.pt")
    assert run_script("experiments/mnist_paper.py", *ship) == 2
    assert not (package / "paper-mnist.pt").exists()


def test_plot_meta_eval_reads_tensorboard_logs(tmp_path: Path, run_script) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "tb")) as w:
        for step, ratio in [(0, 1.5), (20, 0.9), (40, 0.8), (60, 0.95)]:
            w.add_scalar("eval/ratio_vs_adam", ratio, step)
    out = tmp_path / "out"
    args = ["--run", f"a={tmp_path / 'tb'}@40", "--run", f"b={tmp_path / 'tb'}", "--out", str(out)]
    assert run_script("experiments/plot_meta_eval.py", *args, "--mark", "0.85") == 0
    rows = (out / "meta_eval.csv").read_text().splitlines()
    assert rows[0] == "run,meta_iteration,ratio_vs_adam"
    assert [r for r in rows if r.startswith("a,")] == ["a,0,1.5000", "a,20,0.9000", "a,40,0.8000"]
    assert len([r for r in rows if r.startswith("b,")]) == 4
    assert (out / "meta_eval.png").read_bytes()[:4] == b"\x89PNG"
    assert run_script("experiments/plot_meta_eval.py", "--run", "no-equals", "--out", str(out)) == 2


def test_general_variants_switch_off_the_adaptation_and_the_training(
    tmp_path: Path, run_script
) -> None:
    from learned_opt import save_rule
    from learned_opt.rules import GeneralLSTMRule

    rule = GeneralLSTMRule(hidden_size=4, lr=0.01, lr_adapt=0.1)
    rule.reset_parameters(torch.Generator().manual_seed(0), zero_output=False)
    with torch.no_grad():
        rule.log_lr.add_(0.5)  # "trained": the base learning rate moved
    save_rule(tmp_path / "w.pt", rule, {"command": "learned-opt meta-train ..."})
    out = tmp_path / "variants"
    assert run_script("experiments/general_variants.py", "--weights", str(tmp_path / "w.pt"),
                      "--out", str(out)) == 0
    off, meta = load_rule(out / "no-lr-adapt.pt")
    assert off.lr_adapt == 0.0 and meta["source_command"] == "learned-opt meta-train ..."
    assert len(meta["source_sha256"]) == 64
    for (name, a), b in zip(rule.state_dict().items(), off.state_dict().values()):
        assert torch.equal(a, b), name
    fresh, _ = load_rule(out / "untrained.pt")
    assert fresh.config() == rule.config()
    assert torch.count_nonzero(fresh.out_weight) == 0
    assert abs(float(fresh.log_lr.detach().exp()) - 0.01) < 1e-6
    # a rule without the adaptation is refused
    save_rule(tmp_path / "plain.pt", GeneralLSTMRule(hidden_size=4))
    assert run_script("experiments/general_variants.py", "--weights", str(tmp_path / "plain.pt"),
                      "--out", str(out)) == 2


def test_stable_adapt_writes_the_configuration_and_its_ablations(
    tmp_path: Path, run_script
) -> None:
    out = tmp_path / "stable"
    assert run_script("experiments/stable_adapt.py", "--out", str(out)) == 0
    rules = {p.stem: load_rule(p) for p in sorted(out.glob("*.pt"))}
    assert set(rules) == {"stable", "no-warmup", "no-shrink", "no-clip", "no-clip-warmup",
                          "no-slowdown", "no-adapt"}
    full, meta = rules["stable"]
    assert meta["command"].startswith("python experiments/stable_adapt.py --out")
    assert full.lr_adapt == 0.1 and full.grad_clip == 2.0 and full.lr_adapt_shrink == 3.0
    assert full.grad_clip_warmup == 3.0
    assert abs(float(full.log_lr.detach().exp()) - 0.01) < 1e-6
    assert torch.count_nonzero(full.out_weight) == 0  # untrained: a zero read-out
    for name, key, off in (("no-warmup", "lr_adapt_warmup", 0.0), ("no-shrink", "lr_adapt_shrink",
                           1.0), ("no-clip", "grad_clip", 0.0), ("no-adapt", "lr_adapt", 0.0),
                          ("no-slowdown", "lr_adapt_slowdown", 0.0),
                          ("no-clip-warmup", "grad_clip_warmup", 0.0)):
        config = rules[name][0].config()
        assert config[key] == off
        assert {k: v for k, v in config.items() if k != key} == {
            k: v for k, v in full.config().items() if k != key}, name
    # the earlier configuration stays available by name
    assert run_script("experiments/stable_adapt.py", "--out", str(tmp_path / "s9"), "--config",
                      "session9") == 0
    old, meta = load_rule(tmp_path / "s9" / "stable.pt")
    assert old.grad_clip_warmup == 0.0 and "session9" in meta["note"]
    assert old.config() == rules["no-clip-warmup"][0].config()


def test_select_adapt_valood_ranks_the_grid(tmp_path: Path, run_script) -> None:
    args = ("--steps", "3", "--tasks", "1", "--lrs", "0.01,0.02", "--kappas", "0.1")
    assert run_script("experiments/select_adapt_valood.py", *args, "--out", str(tmp_path)) == 0
    rows = json.loads((tmp_path / "grid.json").read_text())["rows"]
    assert sorted((r["lr"], r["kappa"]) for r in rows) == [(0.01, 0.1), (0.02, 0.1)]
    assert [r["worst"] for r in rows] == sorted(r["worst"] for r in rows)
    assert all(list(r["ratios"]) == ["0:" + next(iter(r["ratios"]))[2:]] for r in rows)
    assert all(r["worst"] > 0 for r in rows)
    # the same grid with other options of the rule (here: the gradient clipping)
    out = tmp_path / "clip"
    assert run_script("experiments/select_adapt_valood.py", *args, "--rule-kwargs",
                      '{"grad_clip": 2.0}', "--out", str(out)) == 0
    clipped = json.loads((out / "grid.json").read_text())
    assert clipped["rule_kwargs"] == {"grad_clip": 2.0}
    assert {r["lr"]: r["worst"] for r in clipped["rows"]} != {r["lr"]: r["worst"] for r in rows}


def test_valood_weights_agrees_with_the_grid_check(tmp_path: Path, run_script) -> None:
    """experiments/valood_weights.py on a weights file gives the ratio that
    select_adapt_valood.py gives for the same configuration (same tasks, same tuned Adam)."""
    from learned_opt import save_rule
    from learned_opt.rules import GeneralLSTMRule

    kwargs = {"lr_adapt_warmup": 5.0, "grad_clip": 2.0}
    save_rule(tmp_path / "w.pt", GeneralLSTMRule(hidden_size=1, lr=0.02, lr_adapt=0.1, **kwargs))
    common = ("--steps", "3,5", "--tasks", "2")  # Adam: the default grid in both
    assert run_script("experiments/select_adapt_valood.py", *common, "--lrs", "0.01,0.02",
                      "--kappas", "0.1", "--rule-kwargs", json.dumps(kwargs), "--out",
                      str(tmp_path / "grid")) == 0
    assert run_script("experiments/valood_weights.py", "--weights",
                      f"a={tmp_path / 'w.pt'},b={tmp_path / 'w.pt'}", *common, "--out",
                      str(tmp_path / "w")) == 0
    grid = json.loads((tmp_path / "grid" / "grid.json").read_text())["rows"]
    want = next(r for r in grid if r["lr"] == 0.02)["ratios"]
    got = json.loads((tmp_path / "w" / "results.json").read_text())["rows"]
    assert [r["steps"] for r in got] == [3, 3, 5, 5]
    assert [r["ratio"]["a"] for r in got] == pytest.approx(list(want.values()))
    assert all(r["ratio"]["a"] == r["ratio"]["b"] for r in got)
    table = (tmp_path / "w" / "table.md").read_text()
    assert "| **tasks won** | 3 |" in table and "| **geometric mean** | 5 |" in table


def test_adapt_variants_harness_matches_the_rule_and_runs(run_script, capsys) -> None:
    """The exploration harness's optimizer computes what the general rule computes at a zero
    read-out (with the stabilizers on), and both commands run."""
    import runpy

    from learned_opt import LearnedOptimizer
    from learned_opt.rules import GeneralLSTMRule
    from learned_opt.tasks import RandomMLPFamily

    root = Path(__file__).resolve().parents[1]
    harness = runpy.run_path(str(root / "experiments" / "adapt_variants.py"))
    options = harness["parse_variant"]("warmup=5,shrink=3,clip=2,slowdown=3,window=0")
    assert options == {"warmup": 5.0, "shrink": 3.0, "clip": 2.0, "slowdown": 3.0, "window": 0}
    rule = GeneralLSTMRule(hidden_size=1, lr=0.01, lr_adapt=0.1, lr_adapt_warmup=5.0,
                           lr_adapt_shrink=3.0, grad_clip=2.0, lr_adapt_slowdown=3.0).double()
    family = RandomMLPFamily("digits", (16,), (1,), ("relu",), (16,))
    runs = []
    for factory in (lambda p: harness["AdaptiveAdam"](p, **options),
                    lambda p: LearnedOptimizer(p, rule)):
        task = family.sample(torch.Generator().manual_seed(0))
        leaves = {k: v.double().requires_grad_(True)
                  for k, v in task.init_params(torch.Generator().manual_seed(1)).items()}
        opt = factory(list(leaves.values()))
        for _ in range(30):
            opt.zero_grad()
            batch = task.train.sample()
            batch = tuple(x.double() if x.is_floating_point() else x for x in batch)
            task.loss(leaves, batch).backward()
            opt.step()
        runs.append(torch.cat([p.detach().reshape(-1) for p in leaves.values()]))
    # (the rule stores its base lr as a float32 log: 1e-7 relative)
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-7)
    assert run_script("experiments/adapt_variants.py", "seeds", "base", "clip=2", "--task",
                      "breast-cancer-mlp-relu-2x64", "--steps", "3", "--seeds", "2") == 0
    out = capsys.readouterr().out
    assert out.startswith("adam (lr 0.03): ") and "clip=2: " in out


def test_trained_vs_init_compares_a_checkpoints_rule_with_its_start(
    tmp_path: Path, run_script
) -> None:
    """At a zero read-out the checkpoint's rule is its own initialization (every ratio exactly 1);
    a moved read-out changes the ratios; a weights file is not a trainer checkpoint."""
    from learned_opt import save_rule
    from learned_opt.checkpoint import atomic_save, rule_to_dict
    from learned_opt.rules import GeneralLSTMRule

    rule = GeneralLSTMRule(hidden_size=2, lr=0.01, lr_adapt=0.1, grad_clip=2.0, additive=False)
    args = ("--family", "digits", "--steps", "4", "--tasks", "2")
    results = {}
    for name, bias in (("same", 0.0), ("moved", 3.0)):
        with torch.no_grad():
            rule.out_bias.fill_(bias)
        atomic_save({"rule": rule_to_dict(rule), "iteration": 7}, tmp_path / f"{name}.pt")
        out = tmp_path / f"{name}.json"
        assert run_script("experiments/trained_vs_init.py", "--checkpoint",
                          str(tmp_path / f"{name}.pt"), *args, "--out", str(out)) == 0
        results[name] = json.loads(out.read_text())
    assert [r["ratio"] for r in results["same"]["rows"]] == [1.0, 1.0]
    assert results["same"]["won"] == 0 and results["same"]["iteration"] == 7
    assert all(r["ratio"] != 1.0 for r in results["moved"]["rows"])
    save_rule(tmp_path / "w.pt", rule)
    assert run_script("experiments/trained_vs_init.py", "--checkpoint", str(tmp_path / "w.pt"),
                      *args) == 2


def test_ship_general_records_the_benchmark_figures(tmp_path: Path, run_script) -> None:
    weights, bench, package = tmp_path / "w.pt", tmp_path / "bench", tmp_path / "package"
    package.mkdir()
    rule, _ = load_rule(pretrained.path("quadratic"))
    run = {"command": "learned-opt meta-train --family quadratic", "commit": "abc"}
    save_rule(weights, rule, {"config": {"rule": "lstm"}, "all_commands": [run]})
    smoke = ["--smoke", "--weights", f"w={weights}", "--tasks", "wine-mlp-tanh-32"]
    assert run_script("benchmarks/ood.py", *smoke, "--out", str(bench)) == 0
    ship = ["--weights", str(weights), "--benchmarks", str(bench), "--ship-to", str(package)]
    assert run_script("experiments/ship_general.py", *ship, "--name", "g", "--allow-above-one") == 0
    shipped, meta = load_rule(package / "g.pt")
    for a, b in zip(shipped.parameters(), rule.parameters()):
        assert torch.equal(a, b)  # only the metadata changed
    assert meta["command"] == run["command"] and meta["commit"] == "abc"
    assert json.loads((package / "g.json").read_text()) == meta
    (stream,) = meta["figures"]["by_steps"]["6"]["streams"]
    table = (bench / "table.md").read_text()
    ratio = stream["ratios"]["wine-mlp-tanh-32"]
    assert "| wine-mlp-tanh-32 | 6 | " in table and f"| {ratio:.3f} |" in table
    assert meta["figures"]["worst_ratio"] == max(
        s["worst"] for e in meta["figures"]["by_steps"].values() for s in e["streams"]
    )
    # a ratio above 1 is refused without --allow-above-one; so are other weights
    lines = table.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("| wine-mlp-tanh-32 | 6 |"))
    lines[i] = lines[i].rsplit("|", 2)[0] + "| 1.500 |"
    (bench / "table.md").write_text("\n".join(lines) + "\n")
    assert run_script("experiments/ship_general.py", *ship, "--name", "h") == 2
    assert not (package / "h.pt").exists()
    other = tmp_path / "other.pt"
    save_rule(other, LSTMRule(), {"config": {}, "all_commands": [run]})
    ship[1] = str(other)  # a table of w.pt cannot vouch for other weights
    assert run_script("experiments/ship_general.py", *ship, "--allow-above-one", "--label=w") == 2
    assert sorted(p.name for p in package.iterdir()) == ["g.json", "g.pt"]
