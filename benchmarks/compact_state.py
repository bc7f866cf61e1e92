"""Benchmark: the memory and the quality cost of ``LSTMOptimizer(state_dtype=torch.bfloat16)``.

For each of ``--tasks`` tasks of ``--family`` (default ``validation``, the validation task group;
drawn as ``benchmarks/bf16_quality.py`` draws them, from
``learned_opt.evaluate.STATE_DTYPE_STREAM``),
``LSTMOptimizer`` (``--weights``, default the shipped default) trains the same initial weights on
the same minibatches three times:

- ``fp32``: the optimizer state in float32 (the default);
- ``bf16``: the per-coordinate state stored in bfloat16 (computed in float32);
- ``fp32-nudged``: float32 state again, from initial weights scaled by ``1 + 2**-20`` (a change of
  about one float32 rounding): the noise floor. Training amplifies any tiny difference, so the
  spread of the ``fp32-nudged / fp32`` ratios shows how far apart two runs are that differ by
  nothing that matters; the bf16 ratios are read against it.

A ratio of two near-zero losses says nothing, so only the tasks on which the ``fp32`` run's final
training loss stays at least ``--min-loss-fraction`` (default 5%) of its first minibatch loss are
*rated*; the others are listed and left out of the summaries. Reported per task and, over the
rated tasks, as the geometric mean, min, median and max: the ratio to ``fp32`` of the final loss
on the whole training set, of the final held-out loss (the family's holdout split), and of the
mean minibatch loss over the run. Also the optimizer state's bytes per parameter of each (the
sum of ``element_size() * numel()`` of every tensor in ``opt.state``, divided by the number of
parameters), and the state entries of the default rule. Writes ``records.jsonl`` and
``table.md``.

    python benchmarks/compact_state.py --out benchmarks/results/compact_state
    python benchmarks/compact_state.py --smoke --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from learned_opt import LSTMOptimizer
from learned_opt.evaluate import (
    STATE_DTYPE_STREAM,
    evaluation_family,
    geometric_mean,
    run_optimizer,
    task_seed,
)
from learned_opt.report import write_results
from learned_opt.tasks import FAMILIES

#: mode -> (state dtype, factor on the initial weights)
MODES: dict[str, tuple[torch.dtype | None, float]] = {
    "fp32": (None, 1.0),
    "bf16": (torch.bfloat16, 1.0),
    "fp32-nudged": (None, 1.0 + 2.0**-20),
}
METRICS = {
    "final_train_loss": "final train loss",
    "final_test_loss": "final held-out loss",
    "mean_train_loss": "mean minibatch loss",
}


def state_bytes(opt: torch.optim.Optimizer) -> tuple[int, Counter]:
    """Total bytes of the tensors in ``opt.state`` and the bytes per (entry, dtype)."""
    per_entry: Counter = Counter()
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, Tensor):
                per_entry[f"{key} ({str(value.dtype).removeprefix('torch.')})"] += (
                    value.element_size() * value.numel()
                )
    return sum(per_entry.values()), per_entry


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--weights", default=None, help="default: the shipped default weights")
    parser.add_argument("--family", default="validation", choices=sorted(FAMILIES))
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--min-loss-fraction",
        type=float,
        default=0.05,
        help="rate a task when fp32's final training loss is at least this fraction of its first",
    )
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.tasks = 10, 2
    family = evaluation_family(args.family)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    records: list[dict[str, Any]] = []
    entries: dict[str, Counter] = {}
    for k in range(args.tasks):
        seed = task_seed(args.seed, STATE_DTYPE_STREAM, k)
        for mode, (dtype, nudge) in MODES.items():
            made: list[LSTMOptimizer] = []

            def factory(
                params: list[Tensor], lr: float, dtype=dtype, nudge=nudge, made=made
            ) -> LSTMOptimizer:
                if nudge != 1.0:
                    with torch.no_grad():
                        for p in params:
                            p.mul_(nudge)
                made.append(LSTMOptimizer(params, weights=args.weights, lr=lr, state_dtype=dtype))
                return made[0]

            rec = run_optimizer(family, seed, factory, 1.0, args.steps, name=mode).record()
            (opt,) = made
            total, per_entry = state_bytes(opt)
            params = sum(p.numel() for group in opt.param_groups for p in group["params"])
            entries[mode] = Counter({key: v / params for key, v in per_entry.items()})
            losses = rec.pop("losses")
            rec.update(
                what="compact_state",
                mode=mode,
                state_dtype=str(dtype).removeprefix("torch.") if dtype else "param dtype",
                weights=args.weights,
                family=family.config(),
                steps=args.steps,
                params=params,
                state_bytes=total,
                state_bytes_per_param=total / params,
                mean_train_loss=float(np.mean(losses)) if losses else math.nan,
                initial_train_loss=losses[0] if losses else math.nan,
            )
            records.append(rec)

    by_task: dict[int, dict[str, dict[str, Any]]] = {}
    for r in records:
        by_task.setdefault(r["seed"], {})[r["mode"]] = r

    def rated(t: dict[str, dict[str, Any]]) -> bool:
        ref = t["fp32"]
        return ref["final_train_loss"] >= args.min_loss_fraction * ref["initial_train_loss"]

    def ratio(t: dict[str, dict[str, Any]], mode: str, metric: str) -> float:
        a, b = t[mode][metric], t["fp32"][metric]
        return 1.0 if a == b else (a / b if b > 0 else math.inf)

    def ratios(mode: str, metric: str) -> list[float]:
        return [ratio(t, mode, metric) for t in by_task.values() if rated(t)]

    n_rated = sum(rated(t) for t in by_task.values())

    bpp = {
        mode: np.mean([r["state_bytes_per_param"] for r in records if r["mode"] == mode])
        for mode in MODES
    }
    weights = args.weights or "default"
    lines = [
        f"LSTMOptimizer ({weights} weights) on {args.tasks} {args.family} tasks, {args.steps} "
        "steps, same initial weights and minibatches; ratios to the float32-state run.",
        "",
        f"State bytes per parameter: fp32 {bpp['fp32']:.2f}, bf16 {bpp['bf16']:.2f} "
        "(mean over the tasks; Adam keeps 8).",
        "",
        f"Rated: {n_rated} of {len(by_task)} tasks (fp32's final training loss at least "
        f"{args.min_loss_fraction:g} of its first minibatch loss); the summaries are over them.",
        "",
        "| task | params | rated | "
        + " | ".join(f"{label}: fp32 | bf16 / fp32 | nudged / fp32" for label in METRICS.values())
        + " |",
        "| --- | ---: | --- |" + " ---: | ---: | ---: |" * len(METRICS),
    ]
    for t in by_task.values():
        cells = [
            f"{t['fp32'][m]:.4g} | {ratio(t, 'bf16', m):.4f} | {ratio(t, 'fp32-nudged', m):.4f}"
            for m in METRICS
        ]
        head = f"| {t['fp32']['task']} | {t['fp32']['params']} | {'yes' if rated(t) else 'no'} | "
        lines.append(head + " | ".join(cells) + " |")
    if not n_rated:
        lines.append("")
        lines.append("No task is rated: nothing to summarize.")
        write_results(out, records, lines)
        return 0
    cells = ["geometric mean (rated)", "", ""]
    for m in METRICS:
        cells += ["", f"{geometric_mean(ratios('bf16', m)):.4f}"]
        cells += [f"{geometric_mean(ratios('fp32-nudged', m)):.4f}"]
    lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| ratio to fp32 | metric | geometric mean | min | median | max |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for mode in ("bf16", "fp32-nudged"):
        for m, label in METRICS.items():
            rs = ratios(mode, m)
            lines.append(
                f"| {mode} | {label} | {geometric_mean(rs):.4f} | {min(rs):.4f} | "
                f"{float(np.median(rs)):.4f} | {max(rs):.4f} |"
            )
    lines += ["", "| state entry (dtype) | fp32: bytes/param | bf16: bytes/param |"]
    lines.append("| --- | ---: | ---: |")
    keys = {k.split(" ")[0]: None for k in list(entries["fp32"]) + list(entries["bf16"])}
    for key in keys:
        a = {k: v for k, v in entries["fp32"].items() if k.split(" ")[0] == key}
        b = {k: v for k, v in entries["bf16"].items() if k.split(" ")[0] == key}
        fa = ", ".join(f"{v:.2f} {k.split(' ')[1]}" for k, v in a.items())
        fb = ", ".join(f"{v:.2f} {k.split(' ')[1]}" for k, v in b.items())
        lines.append(f"| {key} | {fa} | {fb} |")
    lines.append("")
    lines.append("(state entries: the last task's optimizer)")
    write_results(out, records, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
