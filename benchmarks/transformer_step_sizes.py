"""Diagnostic: where the learned optimizer's per-tensor step sizes go on the character transformer.

The model, data and initial weights of ``benchmarks/time_to_target.py`` (4 layers, width 256,
3.25M parameters, batch 16 x 128 characters), trained by ``LSTMOptimizer`` with each of
``--weights`` at each update multiplier of ``--lrs`` (the optimizer's ``lr``; 1.0 is the rule as
meta-trained) for ``--steps`` steps; at each of ``--at`` it reads every weight matrix's adapted
step-size multiplier (``exp(log_step)`` in ``opt.state``: the factor on the rule's nominal rate,
0.01) and reports their minimum, median and maximum, the three largest, and the minibatch loss.
Writes
``records.jsonl`` and ``table.md`` into ``--out``.

    python benchmarks/transformer_step_sizes.py --out benchmarks/results/transformer_step_sizes
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from time_to_target import _DATA_STREAM, _loss, _model  # noqa: E402  (this folder's modules)

from learned_opt import LSTMOptimizer  # noqa: E402
from learned_opt.corpus import load_corpus  # noqa: E402
from learned_opt.report import write_results  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--weights", default="general-wide,general-v2", help="comma list")
    parser.add_argument("--lrs", default="1.0", help="comma list of update multipliers (lr)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--at", default="50,100,200", help="steps at which to read the state")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="a tiny model, a few steps")
    args = parser.parse_args(argv)
    model_args = argparse.Namespace(seed=0, context=128, d_model=256, heads=4, layers=4, batch=16)
    if args.smoke:
        model_args = argparse.Namespace(seed=0, context=16, d_model=32, heads=2, layers=1, batch=4)
        args.steps, args.at = 4, "2,4"
    torch.set_num_threads(args.threads)
    at = {int(s) for s in args.at.split(",")}
    corpus = load_corpus()
    records = []
    runs = [(w, float(lr)) for w in args.weights.split(",") for lr in args.lrs.split(",")]
    for weights, lr in runs:
        model = _model(corpus, model_args)
        opt = LSTMOptimizer(model.parameters(), weights=weights, lr=lr)
        data = torch.Generator().manual_seed(model_args.seed * 1000 + _DATA_STREAM)
        for step in range(1, args.steps + 1):
            x, y = corpus.batch("train", model_args.batch, model_args.context, data)
            loss = _loss(model, x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step in at:
                mult = {
                    name: float(torch.exp(opt.state[p]["log_step"]).mean())
                    for name, p in model.named_parameters()
                    if p.dim() == 2
                }
                values = list(mult.values())
                largest = sorted(mult, key=mult.get, reverse=True)[:3]
                records.append({"weights": weights, "lr": lr, "step": step, "loss": loss.item(),
                                "min": min(values), "median": statistics.median(values),
                                "max": max(values), "largest": largest,
                                "multipliers": mult})  # fmt: skip
    lines = [
        "Step-size multipliers of the weight matrices (exp(log_step), on the nominal 0.01) on "
        "the time-to-target character transformer; "
        f"`python benchmarks/transformer_step_sizes.py --weights {args.weights} --lrs {args.lrs} "
        f"--steps {args.steps} --at {args.at}`",
        "",
        "| weights | lr | step | minibatch loss | min | median | max | largest three |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in records:
        lines.append(
            f"| {r['weights']} | {r['lr']:g} | {r['step']} | {r['loss']:.3f} | {r['min']:.2f} | "
            f"{r['median']:.2f} | {r['max']:.2f} | {', '.join(r['largest'])} |"
        )
    write_results(args.out, records, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
