"""Benchmark: what each part of a learned optimizer's rule is worth, on the tasks that choose.

Runs a rule (``--weights``, default: the shipped default) and variants of it on the meta-
trainer's held-out tasks (the ``validation`` group, the trainer's evaluation seeds: the same
tasks and metric as a meta-training run's ``eval/metric``, so the figures compare with its
logs; ``--family`` names another group, e.g. ``meta-train``, to see what a part is worth on the
tasks a rule was meta-trained on) beside Adam with its learning rate tuned on them, all in one
run:

- ``as given``: the rule untuned;
- ``learned output zeroed``: its learned read-out (and a learned gain on its step-size
  adaptation, and a learned schedule) at zero, the hand-designed part alone
  (``benchmarks/sealed_optimizers.py``'s ``zero_readout``);
- ``LSTM read-out zeroed`` (rules with other learned parts too: a learned adaptation or
  schedule): only the per-coordinate correction of the direction (the LSTM's ``out_weight``
  and ``out_bias``) at zero, the rest as given: what the learned direction adds;
- ``direction correction zeroed`` (rules with ``direction_correction``): only the learned
  correction of each tensor's direction at zero, the rest as given;
- ``adaptation off``: the per-tensor step-size adaptation off (``lr_adapt=0``);
- ``adaptation off, output zeroed``: both, i.e. Adam at the rule's base learning rate with the
  rule's gradient clipping;
- ``direction 30% towards Adam's``, ``direction 30% beyond Muon's`` (rules that move matrices
  along Muon's direction): every matrix along :math:`d_M + t (d_A - d_M)` with a constant
  :math:`t = 0.3` or :math:`-0.3` (``orthogonal_mix`` with a zero read-out and a constant
  bias), Muon's direction :math:`d_M` and Adam's :math:`d_A`: how much a per-tensor mix has
  to gain at all;
- ``rate x0.5``, ``rate x2``: the optimizer's ``lr`` multiplier, constant;
- ``cosine decay``: the multiplier decayed from 1 to 0 over the run (``LambdaLR``).

Variants that do not apply to the rule (no adaptation to switch off) are left out. Per variant:
each task's final loss and the metric (geometric mean over tasks), and the ratio to the rule as
given and to tuned Adam. Writes ``records.jsonl``, ``table.md`` and ``provenance.json`` (the
command, commit, torch version, CPU, cores and threads) into ``--out``.

    python benchmarks/ablations.py --out DIR
    python benchmarks/ablations.py --weights runs/adaptation-gain/weights.pt --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from learned_opt import LearnedOptimizer, load_rule, pretrained
from learned_opt.evaluate import DEFAULT_LR_GRID, HAND_DESIGNED, run_optimizer, tune_lr
from learned_opt.outer.config import MetaTrainConfig
from learned_opt.outer.held_out import HeldOut
from learned_opt.report import write_results
from learned_opt.rules import ScheduledRule, UpdateRule
from learned_opt.tasks import make_family

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sealed_optimizers import zero_readout  # noqa: E402

#: ``lr`` multiplier at step t (0-based) of a run of T steps, per schedule variant.
SCHEDULES: dict[str, Callable[[int, int], float]] = {
    "rate x0.5": lambda t, total: 0.5,
    "rate x2": lambda t, total: 2.0,
    "cosine decay": lambda t, total: 0.5 * (1 + math.cos(math.pi * min(t, total) / total)),
}


def zero_lstm_readout(rule: UpdateRule) -> UpdateRule | None:
    """A copy of ``rule`` with only its LSTM's per-coordinate read-out (``out_weight``,
    ``out_bias``) at zero; ``None`` if that is all it learns (then ``learned output zeroed`` is
    the same rule) or it has none."""
    out = copy.deepcopy(rule)
    readouts = [m for m in out.modules() if isinstance(getattr(m, "out_weight", None), Tensor)]
    others = any(
        getattr(m, "controller_w1", None) is not None
        or (isinstance(m, ScheduledRule) and m.config().get("learn_schedule", False))
        for m in out.modules()
    )
    if not readouts or not others:
        return None
    with torch.no_grad():
        for module in readouts:
            module.out_weight.zero_()
            module.out_bias.zero_()
    return out


def _with_base(rule: UpdateRule, **changes: Any) -> UpdateRule:
    """``rule.variant(**changes)``; for a :class:`ScheduledRule`, the same schedule around its
    base rule's variant."""
    if isinstance(rule, ScheduledRule):
        out = copy.deepcopy(rule)
        out.base = rule.base.variant(**changes)
        return out
    return rule.variant(**changes)


def variants(rule: UpdateRule) -> dict[str, tuple[UpdateRule, str | None]]:
    """Name -> (rule, schedule name or None) of every variant that applies to ``rule``."""
    out: dict[str, tuple[UpdateRule, str | None]] = {"as given": (rule, None)}
    with contextlib.suppress(ValueError):  # (no learned output to zero)
        out["learned output zeroed"] = (zero_readout(rule), None)
    if (readout_zeroed := zero_lstm_readout(rule)) is not None:
        out["LSTM read-out zeroed"] = (readout_zeroed, None)
    base = rule.unwrapped  # (inside a schedule around it)
    if getattr(base, "direction_correction", False):
        straight = copy.deepcopy(rule)
        with torch.no_grad():
            straight.unwrapped.correction_weight.zero_()
            straight.unwrapped.correction_bias.zero_()
        out["direction correction zeroed"] = (straight, None)
    if getattr(base, "controller_drift", 0) > 0 and not getattr(base, "lr_adapt_learned", False):
        out["learned drift off"] = (_with_base(rule, controller_drift=0.0), None)  # gain alone
    if getattr(base, "lr_adapt", 0) > 0:
        plain = _with_base(
            rule, lr_adapt=0.0, lr_size_ref=0.0, controller_hidden=0, controller_drift=0.0,
            **({"lr_adapt_learned": False, "controller_size": False}
               if getattr(base, "lr_adapt_learned", False) else {}),
        )  # fmt: skip
        out["adaptation off"] = (plain, None)
        out["adaptation off, output zeroed"] = (zero_readout(plain), None)
    if getattr(base, "orthogonal", False):
        for name, t in (
            ("direction 30% towards Adam's", 0.3),
            ("direction 30% beyond Muon's", -0.3),
        ):
            mixed = _with_base(rule, orthogonal_mix=True)
            with torch.no_grad():
                mixed.unwrapped.mix_weight.zero_()
                mixed.unwrapped.mix_bias.fill_(math.atanh(t))
            out[name] = (mixed, None)
    for name in SCHEDULES:
        out[name] = (rule, name)
    return out


def run_variant(held: HeldOut, rule: UpdateRule, schedule: str | None) -> list[float]:
    horizon = held.horizon

    def factory(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
        opt = LearnedOptimizer(params, rule, lr=lr)
        if schedule is None:
            return opt
        multiplier = SCHEDULES[schedule]
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: multiplier(t, horizon))
        opt.register_step_post_hook(lambda *_: scheduler.step())
        return opt

    runs = [run_optimizer(held.family, s, factory, 1.0, horizon) for s in held.seeds]
    return [getattr(r, held.metric_name) for r in runs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=pretrained.DEFAULT, help="name or .pt file")
    parser.add_argument("--steps", type=int, default=500, help="steps per task")
    parser.add_argument("--tasks", type=int, default=8, help="held-out tasks")
    parser.add_argument(
        "--only", action="append", default=None,
        help="a variant, or a comma list of them; repeatable (default: all)",
    )  # fmt: skip
    parser.add_argument("--family", default="validation", help="task family (validation)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # Run without the horizon: a schedule around the rule would not act (the rule inside it)
    rule = load_rule(pretrained.resolve(args.weights))[0].unwrapped
    config = MetaTrainConfig(
        objective="final-train",
        log_meta_loss=True,
        eval_family=args.family,
        eval_tasks=args.tasks,
        eval_horizon=args.steps,
    )
    held = HeldOut(config, make_family(args.family))
    chosen = variants(rule)
    if args.only:
        # a value that is a variant's whole name is that variant (some names hold a comma)
        names = [
            n.strip()
            for value in args.only
            for n in ([value] if value.strip() in chosen else value.split(","))
        ]
        if unknown := sorted(set(names) - set(chosen)):
            parser.error(f"unknown variants {unknown}; choose from {sorted(chosen)}")
        chosen = {n: chosen[n] for n in ["as given", *names] if n in chosen}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tuning = tune_lr(
        held.family, HAND_DESIGNED["adam"], held.seeds, held.horizon, DEFAULT_LR_GRID,
        name="adam", metric=held.metric_name, aggregate=held.aggregate,
    )  # fmt: skip
    adam = [getattr(r, held.metric_name) for r in tuning.runs]
    edge = ", at the edge of the grid" if tuning.at_edge else ""
    if tuning.at_edge:
        grid = sorted(tuning.grid)
        print(f"warning: Adam's best learning rate {tuning.lr:g} is at the edge of the grid "
              f"{grid}: the best rate may lie outside it", file=sys.stderr)  # fmt: skip
    results = {f"Adam, lr {tuning.lr:g} (tuned{edge})": adam}
    for name, (variant, schedule) in chosen.items():
        results[name] = run_variant(held, variant, schedule)
        print(f"{name}: {held.aggregate(results[name]):.4f}", flush=True)
    tasks = [held.family.sample(torch.Generator().manual_seed(s)).name for s in held.seeds]
    given = held.aggregate(results["as given"])
    reference = held.aggregate(adam)
    lines = [
        f"Weights `{args.weights}`; {len(tasks)} tasks of `{args.family}` (the meta-trainer's "
        f"held-out seeds), {args.steps} steps; metric: geometric mean of the final training "
        "loss.",
        "",
        "| variant | metric | / as given | / tuned Adam |",
        "| --- | ---: | ---: | ---: |",
    ]
    head = {"weights": args.weights, "family": args.family, "steps": args.steps,
            "adam_lr": tuning.lr, "adam_lr_at_edge": tuning.at_edge}  # fmt: skip
    records: list[dict[str, Any]] = [{**head, "tasks": tasks}]
    for name, values in results.items():
        metric = held.aggregate(values)
        lines.append(f"| {name} | {metric:.4f} | {metric / given:.3f} | {metric / reference:.3f} |")
        records.append({"variant": name, "metric": metric, "final_losses": values})
    lines += ["", f"Wall time {time.perf_counter() - start:.0f} s."]
    write_results(out, records, lines)  # records.jsonl, table.md, provenance.json
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
