"""Benchmark: is the first-order meta-gradient a descent direction of the meta-loss?

``OptimizerLearner(second_order=False)`` (the meta-trainer's default, and the paper's choice)
treats the optimizee's gradient as a constant of the rule's weights: it drops the Hessian terms
through which a changed step changes every later gradient. This script measures what that costs,
on tasks of the meta-training group (``meta-train-rescaled``) with a shipped rule's weights.

Per task and horizon, with the meta-loss of the meta-trainer (``log`` of the training loss at the
end of the unroll on a fresh batch, ``objective="final-train"``, ``log_meta_loss``):

- the first-order (FO) and second-order (SO, exact) meta-gradients and their cosine;
- the meta-loss's slope along each negative gradient (unit length), by central finite differences
  of the deterministic unroll (same task, batches and initial parameters) at two step sizes:
  a descent direction has a negative slope, and the exact gradient's slope is minus its norm.
  Where the two step sizes disagree (by more than 25%), the meta-loss is not smooth at that
  scale (on conv nets it often is not: ReLU, pooling, batch norm) and no gradient describes it;
  the summary counts the tasks where both directions are smooth.

Prints a table, writes JSONL records and ``table.md``.

    python benchmarks/meta_gradient_bias.py --out benchmarks/results/meta_gradient_bias
    python benchmarks/meta_gradient_bias.py --smoke --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import learned_opt
from learned_opt import load_rule
from learned_opt.evaluate import task_seed
from learned_opt.learners import OptimizerLearner
from learned_opt.outer.estimators.base import meta_parameters
from learned_opt.outer.unroll import UnrollSpec, unroll
from learned_opt.report import write_results
from learned_opt.tasks import make_family

#: Seed stream of the tasks (not one the meta-trainer draws from).
STREAM = 7919


def meta_loss(learner: OptimizerLearner, family, seed: int, horizon: int, grad: bool):
    """The meta-loss of one deterministic unroll, and its gradient if ``grad``."""
    task = family.sample(torch.Generator().manual_seed(seed))
    spec = UnrollSpec(
        horizon=horizon, truncation=horizon, objective="final-train", log_meta_loss=True
    )
    gen = torch.Generator().manual_seed(seed + 1)
    window = list(unroll(learner, task, gen, spec, differentiable=grad))[-1]
    if window.meta_loss is None:
        return None, None
    loss = window.meta_loss
    if not grad:
        return float(loss), None
    params = meta_parameters(learner)
    grads = torch.autograd.grad(loss, params, materialize_grads=True)
    return float(loss.detach()), parameters_to_vector(grads)


def slope(learner: OptimizerLearner, family, seed: int, horizon: int, direction: torch.Tensor,
          eps: float) -> float:  # fmt: skip
    """Central difference of the meta-loss along the unit vector ``direction``."""
    params = meta_parameters(learner)
    base = parameters_to_vector(params).detach()
    values = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            vector_to_parameters(base + sign * eps * direction, params)
        values.append(meta_loss(learner, family, seed, horizon, grad=False)[0])
    with torch.no_grad():
        vector_to_parameters(base, params)
    if any(v is None for v in values):
        return float("nan")
    return (values[0] - values[1]) / (2 * eps)


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--weights", default="general", help="shipped name or weights file")
    parser.add_argument("--family", default="meta-train-rescaled")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--horizons", default="20,50,100")
    parser.add_argument("--eps", type=float, default=1e-3, help="finite-difference step")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tasks, args.horizons = 1, "5"
    torch.set_num_threads(1)
    rule, _ = load_rule(learned_opt.pretrained.resolve(args.weights))
    first = OptimizerLearner(rule, second_order=False)
    second = OptimizerLearner(rule, second_order=True)  # the same rule: the same weights
    family = make_family(args.family)
    records, rows = [], []
    for horizon in [int(h) for h in args.horizons.split(",")]:
        for k in range(args.tasks):
            seed = task_seed(0, STREAM, k)
            start = time.perf_counter()
            loss, g_fo = meta_loss(first, family, seed, horizon, grad=True)
            _, g_so = meta_loss(second, family, seed, horizon, grad=True)
            if loss is None or g_fo is None or g_so is None:
                continue
            name = family.sample(torch.Generator().manual_seed(seed)).name
            n_fo, n_so = float(g_fo.norm()), float(g_so.norm())
            rec = {
                "task": name, "horizon": horizon, "seed": seed, "meta_loss": loss,
                "fo_norm": n_fo, "so_norm": n_so,
                "cosine": float(g_fo @ g_so) / max(n_fo * n_so, 1e-30),
                "seconds": 0.0,
            }  # fmt: skip
            for key, g, norm in (("fo", g_fo, n_fo), ("so", g_so, n_so)):
                u = -g / max(norm, 1e-30)
                rec[f"{key}_slope"] = slope(first, family, seed, horizon, u, args.eps)
                rec[f"{key}_slope_coarse"] = slope(first, family, seed, horizon, u, args.eps * 3)
            rec["smooth"] = all(
                abs(rec[f"{k}_slope"] - coarse) <= 0.25 * abs(coarse)
                for k in ("fo", "so")
                for coarse in [rec[f"{k}_slope_coarse"]]
            )
            rec["seconds"] = time.perf_counter() - start
            records.append(rec)
            rows.append(
                f"| {name} | {horizon} | {loss:.3f} | {n_fo:.3g} | {n_so:.3g} | "
                f"{rec['cosine']:+.2f} | {rec['fo_slope']:+.3g} ({rec['fo_slope_coarse']:+.3g}) | "
                f"{rec['so_slope']:+.3g} ({rec['so_slope_coarse']:+.3g}) | "
                f"{'yes' if rec['smooth'] else 'no'} |"
            )
            print(rows[-1], flush=True)
    lines = [
        f"# First- and second-order meta-gradients ({args.weights} weights, {args.family})",
        "",
        "Meta-loss: log of the training loss at the end of the unroll (fresh batch). Slope: "
        f"central differences (eps {args.eps:g}, in brackets {args.eps * 3:g}) of the "
        "meta-loss along the negative gradient (unit vector); negative: a descent direction; "
        "the exact gradient's slope is minus its norm. Smooth: both directions' two slopes "
        "agree within 25%.",
        "",
        "| task | horizon | meta-loss | FO norm | SO norm | cosine(FO, SO) | FO slope | "
        "SO slope | smooth |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        *rows,
        "",
    ]
    for horizon in sorted({r["horizon"] for r in records}):
        every = [r for r in records if r["horizon"] == horizon]
        rs = [r for r in every if r["smooth"]]
        if not rs:
            lines.append(f"Horizon {horizon}: no task is smooth at these step sizes.")
            continue
        fo_down = sum(r["fo_slope"] < 0 for r in rs)
        so_down = sum(r["so_slope"] < 0 for r in rs)
        summary = (
            f"Horizon {horizon}, the {len(rs)} smooth tasks of {len(every)}: the FO direction "
            f"descends on {fo_down}, the SO direction on {so_down}; median cosine(FO, SO) "
            f"{statistics.median(r['cosine'] for r in rs):+.2f}; median SO slope / -(SO norm) "
            f"{statistics.median(-r['so_slope'] / r['so_norm'] for r in rs):.2f}."
        )
        lines.append(summary)
        print(summary)
    write_results(Path(args.out), records, lines + [""])
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
