"""Recipe of a learned step-size schedule on the default rule, told the run's length (a candidate).

    python experiments/learned_schedule.py               # init, meta-train (resumes), sealed test
    python experiments/learned_schedule.py --dry-run     # print its commands, run nothing
    python experiments/learned_schedule.py --steps meta-train --procs 2
    python experiments/learned_schedule.py --steps validate   # the best weights, 100 / 1,000 steps
    python experiments/learned_schedule.py --steps weights    # the committed run's best weights
    python experiments/learned_schedule.py --steps ship       # after the sealed test

Run it from the repository root. The rule is a :class:`~learned_opt.rules.ScheduledRule` around
the shipped default, ``general-v4`` (its LSTM, read-out and hand-designed adaptation fixed at the
shipped weights, ``learn_lstm=False``): a small MLP of the step ``t`` and the progress ``t / T``
multiplies every update by ``exp(s_t)``, ``|s_t| <= 3``. Only the schedule's 145 weights are
meta-trained. Its last layer starts at zero, so the run starts from ``general-v4``, step for step.

Why this part: on the sealed test group tuned Adam with warm-up and cosine decay beats tuned
constant-rate Adam by 7.6% at 1,000 steps, and ``general-v4`` under the same schedule by 2.8%,
but the same warm-up costs both at 100 steps: the schedule that pays depends on the horizon, which
the rule can read when ``LSTMOptimizer(params, total_steps=N)`` gives it; a one-number-per-step
function of few weights is what evolution strategies over whole runs estimate well (the learned
gain on the adaptation, 65 weights, was the first learned part to help outside meta-training).

The steps:

1. ``init``: writes ``runs/learned-schedule/init.pt``: ``general-v4`` under the identity
   schedule (identical steps to ``general-v4``).
2. ``meta-train``: persistent evolution strategies over whole unrolls of 100-1,000 steps (horizon
   drawn log-uniformly per task and told to the rule; one window per task: unbiased for the
   smoothed objective of the whole run; 8 antithetic pairs, sigma 0.1) on the ``meta-train``
   group at its tasks' own scales (on ``meta-train-rescaled``, whose random parameter and loss
   scales the adaptation must first catch up with, the schedule learned a uniformly larger step,
   1.1-1.16x, and the validation metric rose from 0.5859 to 0.5898 in 20 iterations);
   meta-loss: the log of the final training loss; each task's estimate clipped before the
   mean; weights selected on the ``validation`` group (final training loss at 500 steps, the
   horizon told). It resumes from ``runs/learned-schedule/ckpt``;
   on a fresh machine it first copies the committed checkpoint
   (``experiments/checkpoints/learned-schedule.pt``) there. ``--procs N`` runs it under
   ``torchrun`` with N processes of one thread.
3. ``validate`` (not run by default): the run's best weights (exported to
   ``runs/learned-schedule/weights.pt``) and ``general-v4`` on the validation group's 8
   held-out tasks at 100 and 1,000 steps, the horizon told
   (``benchmarks/results/validation/learned-schedule/``): whether the schedule chosen at 500
   steps helps at the sealed test's horizons.
4. ``weights`` (not run by default): the best weights of the committed checkpoint exported to
   ``runs/learned-schedule/weights.pt`` (the sealed test's input on a fresh clone:
   ``SEALED_ARGS=--total-steps bash benchmarks/results/sealed/candidate.sh
   experiments/learned_schedule.py learned-schedule``).
5. ``sealed``: the sealed test group (``benchmarks/sealed.py --total-steps``) at 100 and 1,000
   steps, once.
6. ``ship`` (not run by default): the committed checkpoint's best weights as the shipped
   ``general-v4-learned-schedule``, with ``unknown_horizon="base"`` (without ``total_steps`` it is
   ``general-v4`` step for step: the schedule was meta-trained only with the horizon told), its
   provenance, validation and sealed figures (against ``general-v4``'s sealed runs) in its
   metadata; ``figures.default_candidate`` records whether it is at most ``general-v4`` at both
   horizons.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import candidates  # noqa: E402

RUN = Path("runs/learned-schedule")
VALIDATION = Path("benchmarks/results/validation/learned-schedule")
CHECKPOINT = Path("experiments/checkpoints/learned-schedule.pt")

#: The shipped weights the schedule is learned around.
BASE = "general-v4"
#: The schedule MLP: hidden units and the bound on ``|s_t|``.
SCHEDULE = {"hidden": 16, "bound": 3.0}
#: The shipped name of the weights, and the sealed runs of ``BASE`` they are compared with.
NAME = "general-v4-learned-schedule"
BASE_SEALED = "adaptation-shrink"

META_TRAIN = [
    "meta-train", "--family", "meta-train", "--rule", "scheduled",
    "--init-weights", str(RUN / "init.pt"),
    "--horizon", "1000", "--min-horizon", "100", "--truncation", "1000",
    "--objective", "final-train", "--log-meta-loss",
    "--estimator", "pes", "--estimator-kwargs", json.dumps({"sigma": 0.1, "pairs": 8}),
    "--clip-grad-per-task", "--meta-lr", "1e-2", "--meta-batch", "4", "--clip-grad", "1",
    "--iterations", "100000", "--time-budget", "20000", "--eval-every", "10",
    "--eval-tasks", "8", "--eval-family", "validation", "--eval-horizon", "500",
    "--checkpoint-every", "2", "--log-dir", str(RUN / "tb"), "--ckpt-dir", str(RUN / "ckpt"),
    "--export", str(RUN / "weights.pt"), "--resume",
]  # fmt: skip


def initial_rule():
    """``general-v4`` (fixed) under the identity schedule."""
    import learned_opt
    from learned_opt import load_rule
    from learned_opt.rules import ScheduledRule

    base, _ = load_rule(learned_opt.pretrained.path(BASE))
    base = base.variant(learn_lstm=False)
    rule = ScheduledRule(base="general-lstm", base_config=base.config(), **SCHEDULE)
    rule.base.load_state_dict(base.state_dict())
    return rule


def write_init(path: Path) -> None:
    from learned_opt import save_rule

    path.parent.mkdir(parents=True, exist_ok=True)
    save_rule(path, initial_rule(), {"source": f"the shipped {BASE!r} under the identity schedule"})


def sealed(steps: int) -> list[str]:
    return [*candidates.sealed_command(RUN, "learned-schedule")(steps), "--total-steps"]


def validate(weights: Path, out: Path, horizons: tuple[int, ...] = (100, 1000)) -> list[dict]:
    """``weights`` and ``general-v4`` on the validation group's held-out tasks (the
    meta-trainer's evaluation, horizon told) at each of ``horizons``; writes ``out``."""
    import torch

    import learned_opt
    from learned_opt import load_rule
    from learned_opt.outer.config import MetaTrainConfig
    from learned_opt.outer.held_out import HeldOut
    from learned_opt.report import write_results
    from learned_opt.tasks import make_family

    torch.set_num_threads(1)
    rules = {
        BASE: load_rule(learned_opt.pretrained.path(BASE))[0],
        "learned schedule": load_rule(weights)[0],
    }
    records = []
    for horizon in horizons:
        config = MetaTrainConfig(
            objective="final-train", log_meta_loss=True, eval_family="validation",
            eval_tasks=8, eval_horizon=horizon,
        )  # fmt: skip
        held = HeldOut(config, make_family("validation"))
        for name, rule in rules.items():
            start = time.perf_counter()
            metric, _ = held.evaluate_rule(rule)
            records.append({"rule": name, "steps": horizon, "metric": metric,
                            "seconds": time.perf_counter() - start})  # fmt: skip
            print(f"{horizon} steps, {name}: {metric:.4f}", flush=True)
    metric = {(r["rule"], r["steps"]): r["metric"] for r in records}
    lines = [
        f"The learned schedule ({weights}) against {BASE} on the validation group's 8 held-out "
        "tasks (geometric mean of the final training loss; the horizon told):",
        "",
        "| rule | " + " | ".join(f"{h} steps" for h in horizons) + " |",
        "| --- | " + " | ".join("---:" for _ in horizons) + " |",
        *(f"| {name} | " + " | ".join(f"{metric[name, h]:.4f}" for h in horizons) + " |"
          for name in rules),
    ]  # fmt: skip
    write_results(out, records, lines)
    return records


def ship(dest: Path, sealed_dir: Path = candidates.SEALED, checkpoint: Path = CHECKPOINT) -> dict:
    """Write the best weights of the committed ``checkpoint`` (those sealed-tested) as
    ``dest/{NAME}.pt`` (and ``.json``), horizon-free without ``total_steps``, with their
    provenance and figures; returns the metadata."""
    import hashlib

    import torch

    import learned_opt
    from learned_opt import load_rule, save_rule
    from learned_opt.cli import git_commit
    from learned_opt.report import read_jsonl
    from learned_opt.rules import ScheduledRule

    trained, meta = load_rule(checkpoint, which="best")
    rule = ScheduledRule(**{**trained.config(), "unknown_horizon": "base"})
    rule.load_state_dict(trained.state_dict())
    state = torch.load(checkpoint, weights_only=True)
    meta.update(
        checkpoint={"file": str(checkpoint), "iteration": state["iteration"],
                    "best_iteration": state["best_iteration"],
                    "best_metric": state["best_metric"]},
        all_commands=(state.get("notes") or {}).get("commands", []),
        eval_history=state.get("history", {}),
    )  # fmt: skip
    figures = candidates.sealed_comparison(
        sealed_dir, "learned-schedule", BASE, (100, 1000), replaced_name=BASE_SEALED,
        benchmark=candidates.TOLD_HORIZON,
    )  # fmt: skip
    records = read_jsonl(VALIDATION / "records.jsonl")
    meta.update(
        source=f"a schedule meta-trained around the shipped {BASE!r} (fixed), read when "
        "total_steps is given",
        recipe="python experiments/learned_schedule.py",
        derived_from={
            "weights": BASE,
            "weights_sha256": hashlib.sha256(
                learned_opt.pretrained.path(BASE).read_bytes()
            ).hexdigest(),
        },
        budget={
            "iterations": state["iteration"],
            "meta_train_seconds": round(float(state["elapsed"]), 1),
            "processes": 2,
            "torch_threads": 1,
        },
        validation={
            "command": "python experiments/learned_schedule.py --steps validate",
            "results": str(VALIDATION),
            "metric": "geometric mean of the final training loss over the validation group's 8 "
            "tasks, the horizon told",
            "by_steps": {str(r["steps"]): {} for r in records},
        },
        figures=figures,
        shipped={
            "command": "python experiments/learned_schedule.py --steps ship",
            "commit": git_commit(),
        },
    )
    for r in records:
        meta["validation"]["by_steps"][str(r["steps"])][r["rule"]] = round(r["metric"], 4)
    dest.mkdir(parents=True, exist_ok=True)
    save_rule(dest / f"{NAME}.pt", rule, meta)
    (dest / f"{NAME}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    candidates.add_arguments(parser)
    # where ship writes: the package by default; tests ship into a temporary directory
    parser.add_argument("--ship-to", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    for step, checkpoint in (("validate", None), ("weights", CHECKPOINT)):
        if step in steps:
            command = candidates.export_best(RUN, checkpoint)
            print(shlex.join(["python", *command]), flush=True)
            if not args.dry_run:
                subprocess.run([sys.executable, *command], check=True)
                if step == "validate":
                    validate(RUN / "weights.pt", VALIDATION)
    shared = [s for s in steps if s not in ("validate", "weights", "ship")]
    if shared or not steps:
        args.steps = ",".join(shared)
        candidates.run_steps(
            args, parser, run=RUN, checkpoint=CHECKPOINT, write_init=write_init,
            meta_train=META_TRAIN, sealed=sealed,
        )  # fmt: skip
    if "ship" in steps:
        from learned_opt import pretrained

        dest = args.ship_to or Path(pretrained.__file__).parent
        print(f"# ship as {NAME!r} into {dest}", flush=True)
        if not args.dry_run:
            ship(dest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
