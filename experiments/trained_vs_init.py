"""A meta-training checkpoint's latest rule against the rule it started from, task by task.

The meta-trainer's selection metric aggregates the held-out tasks into one number (a geometric
mean with ``--log-meta-loss``), and one large gain can hide several losses. This script unrolls
the latest rule of a trainer checkpoint and the untrained rule of the same configuration (a
fresh ``build_rule(kind, config)``: for ``general-lstm`` a zero read-out, whose updates do not
depend on the LSTM's random weights) on the same tasks, seeds and minibatches, and prints per task
the ratio of final training losses (trained / untrained), their geometric mean and the tasks won.
Tasks come from a stream of seeds of their own, disjoint from the trainer's evaluation seeds.

    python experiments/trained_vs_init.py --checkpoint runs/x/ckpt/ckpt_00000045.pt \
        --family val-ood --steps 500 --tasks 8
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.ood import geometric_mean  # noqa: E402
from learned_opt.checkpoint import rule_from_dict, safe_load  # noqa: E402
from learned_opt.evaluate import run_optimizer, task_seed  # noqa: E402
from learned_opt.optim import LearnedOptimizer  # noqa: E402
from learned_opt.rules import build_rule  # noqa: E402
from learned_opt.tasks import make_family  # noqa: E402

_STREAM = 4_000_037  # task seeds of this comparison


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="a meta-trainer checkpoint")
    parser.add_argument("--family", default="val-ood")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--out", type=Path, help="write the per-task results here (JSON)")
    args = parser.parse_args(argv)
    ckpt = safe_load(args.checkpoint)
    if not isinstance(ckpt, dict) or "rule" not in ckpt:
        parser.error(f"{args.checkpoint} is not a meta-trainer checkpoint (no 'rule')")
    trained = rule_from_dict(ckpt["rule"], source=str(args.checkpoint))
    untrained = build_rule(ckpt["rule"]["kind"], ckpt["rule"]["config"])
    family = make_family(args.family)
    rows = []
    for k in range(args.tasks):
        seed = task_seed(0, _STREAM, k)
        runs = [
            run_optimizer(family, seed, lambda p, _lr, rule=rule: LearnedOptimizer(p, rule), 1.0,
                          args.steps)
            for rule in (untrained, trained)
        ]
        base, mine = runs[0].final_train_loss, runs[1].final_train_loss
        rows.append({"task": runs[0].task, "untrained": base, "trained": mine,
                     "ratio": mine / base if base > 0 else math.inf})
        print(f"{k}:{runs[0].task}: untrained {base:.4g}, trained {mine:.4g}, "
              f"ratio {rows[-1]['ratio']:.3f}", flush=True)
    ratios = [r["ratio"] for r in rows]
    gmean = geometric_mean(ratios)
    won = sum(x < 1 for x in ratios)
    print(f"iteration {ckpt.get('iteration')}: geometric mean {gmean:.3f}, "
          f"worst {max(ratios):.3f}, tasks won {won}/{len(rows)}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": "python experiments/trained_vs_init.py " + " ".join(
                sys.argv[1:] if argv is None else argv),
            "iteration": ckpt.get("iteration"), "gmean": gmean, "won": won, "rows": rows,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
