"""Benchmark: does storing the LSTM optimizer's state in bfloat16 change the training result?

``LSTMOptimizer`` (``--weights``, default the paper's ``paper-mnist``) with its hidden and cell
states stored in float32 (the default) and in bfloat16 (``state_dtype=torch.bfloat16``, computed
in float32), on the same MNIST tasks (784-20-10 sigmoid MLP, batch 128, 100 steps), several
seeds. Reports the mean final loss on the whole training set and on the held-out test set for
each, their ratio (bf16 / fp32), and the per-seed spread of that ratio. Writes JSONL records
and ``table.md``.

    python benchmarks/bf16_quality.py --out benchmarks/results/bf16_quality
    python benchmarks/bf16_quality.py --smoke --out /tmp/smoke
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from learned_opt import LSTMOptimizer
from learned_opt.evaluate import STATE_DTYPE_STREAM, evaluation_family, run_optimizer, task_seed
from learned_opt.report import write_results
from learned_opt.tasks import FAMILIES

MODES = {"fp32": None, "bf16": torch.bfloat16}


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--weights", default="paper-mnist")
    parser.add_argument("--family", default="mnist", choices=sorted(FAMILIES))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.family, args.steps, args.seeds = "digits", 10, 2
    # As `learned-opt eval`: train on the whole training split, report the official test split.
    family = evaluation_family(args.family)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    records = []
    for k in range(args.seeds):
        seed = task_seed(args.seed, STATE_DTYPE_STREAM, k)
        for mode, dtype in MODES.items():

            def factory(params: list[torch.Tensor], lr: float, dtype=dtype) -> LSTMOptimizer:
                return LSTMOptimizer(params, weights=args.weights, lr=lr, state_dtype=dtype)

            rec = run_optimizer(family, seed, factory, 1.0, args.steps, name=mode).record()
            rec.update(
                what="bf16_quality",
                state_dtype=mode,
                weights=args.weights,
                family=family.config(),
                steps=args.steps,
            )
            records.append(rec)

    def values(mode: str, metric: str) -> np.ndarray:
        return np.array([r[metric] for r in records if r["state_dtype"] == mode])

    lines = [
        f"LSTMOptimizer (weights {args.weights!r}) on {args.family}, {args.steps} steps, "
        f"{args.seeds} seeds; LSTM state stored in fp32 vs bf16 (computed in fp32)",
        "",
        "| metric | fp32 state mean | bf16 state mean | bf16 / fp32 (means) | "
        "per-seed bf16 / fp32: min | median | max |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for metric in ("final_train_loss", "final_test_loss"):
        a, b = values("fp32", metric), values("bf16", metric)
        per_seed = b / a
        lines.append(
            f"| {metric} | {a.mean():.4f} | {b.mean():.4f} | {b.mean() / a.mean():.4f} | "
            f"{per_seed.min():.4f} | {np.median(per_seed):.4f} | {per_seed.max():.4f} |"
        )
    write_results(out, records, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
