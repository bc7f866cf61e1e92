"""Benchmark: meta-training throughput (inner steps per second) and peak memory on the paper's MNIST
task (784-20-10 sigmoid MLP, batch 128, 2x20 LSTM, first order), for truncation lengths K.

Each K runs in a fresh subprocess so that its peak resident memory (``ru_maxrss``) is its own.
The dataset (MNIST in memory, ~200 MB) is part of every process's footprint; the table also gives
the peak minus the footprint measured just before the first unroll. Also measured side by side:
the same unroll with the fused kernels disabled (the pure-PyTorch path).

    python benchmarks/meta_train_throughput.py --out benchmarks/results/meta_train_throughput
    python benchmarks/meta_train_throughput.py --smoke --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from learned_opt.report import write_jsonl


def worker(family: str, truncation: int, steps: int, threads: int, seconds: float) -> dict:
    import torch

    from learned_opt import LSTMRule, OptimizerLearner, kernels, make_family
    from learned_opt.unroll import unroll

    torch.set_num_threads(threads)
    fam = make_family(family)
    learner = OptimizerLearner(LSTMRule())
    opt = torch.optim.Adam(learner.parameters(), lr=1e-4)
    kernels.available()  # compile/load before timing
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def one_task(seed: int) -> int:
        task = fam.sample(torch.Generator().manual_seed(seed))
        done = 0
        for w in unroll(
            learner, task, torch.Generator().manual_seed(seed), horizon=steps, truncation=truncation
        ):
            opt.zero_grad()
            w.meta_loss.backward()
            opt.step()
            done += w.end - w.start
        return done

    one_task(0)  # warm-up
    start, done, seed = time.perf_counter(), 0, 1
    while time.perf_counter() - start < seconds or seed < 3:
        done += one_task(seed)
        seed += 1
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "steps_per_second": done / seconds,
        "inner_steps": done,
        "peak_rss_mb": peak / 1024,
        "peak_minus_base_mb": (peak - base) / 1024,
        "fused_kernels": kernels.available(),
    }


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--family", default="mnist")
    parser.add_argument("--ks", default="5,20,100")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's default")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per config")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        fam, k, steps, threads, seconds = args.worker
        print(json.dumps(worker(fam, int(k), int(steps), int(threads), float(seconds))))
        return 0
    if args.smoke:
        args.family, args.ks, args.seconds = "digits", "5", 0.5
    import torch

    threads = args.threads or torch.get_num_threads()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records, lines = (
        [],
        [
            f"{args.family}, first-order, horizon 100, {threads} threads, "
            f"torch {torch.__version__}",
            "",
            "| K | kernels | inner steps/s | peak RSS MB | peak - before unroll MB |",
            "| ---: | --- | ---: | ---: | ---: |",
        ],
    )
    for k in [int(x) for x in args.ks.split(",")]:
        for fused in (True, False):
            env = dict(os.environ)
            if not fused:
                env["LEARNED_OPT_NO_EXT"] = "1"
            cmd = [
                sys.executable,
                __file__,
                "--out",
                str(out),
                "--worker",
                args.family,
                str(k),
                "100",
                str(threads),
                str(args.seconds),
            ]
            res = json.loads(
                subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            rec = {
                "what": "meta_train_throughput",
                "family": args.family,
                "truncation": k,
                "threads": threads,
                "fused_requested": fused,
                **res,
            }
            records.append(rec)
            lines.append(
                f"| {k} | {'fused' if res['fused_kernels'] else 'pytorch'} | "
                f"{res['steps_per_second']:.1f} | {res['peak_rss_mb']:.0f} | "
                f"{res['peak_minus_base_mb']:.0f} |"
            )
    write_jsonl(out / "records.jsonl", records)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
