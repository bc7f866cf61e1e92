"""Benchmark: meta-training throughput with 1 and 2 processes (torchrun, gloo), one thread each.

Both runs meta-train on the same tasks (the global meta-batch is split over the processes); the
throughput is inner steps per second of meta-training time as the trainer measures it (start-up
and data loading excluded).

    python benchmarks/distributed_throughput.py --out benchmarks/results/distributed
    python benchmarks/distributed_throughput.py --smoke --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from learned_opt.report import write_results


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--family", default="mnist")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--meta-batch", type=int, default=2)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.family, args.iterations = "quadratic", 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    records = []
    for nproc in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={nproc}",
                "-m",
                "learned_opt",
                "meta-train",
                "--family",
                args.family,
                "--meta-batch",
                str(args.meta_batch),
                "--iterations",
                str(args.iterations),
                "--eval-every",
                "0",
                "--quiet",
                "--ckpt-dir",
                tmp,
            ]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:  # say why: the launcher's and the ranks' output
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-12000:])
                raise RuntimeError(f"torchrun with {nproc} processes exited {proc.returncode}")
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        steps = summary["iterations"] * args.meta_batch * 100
        records.append(
            {
                "what": "distributed_throughput",
                "family": args.family,
                "processes": nproc,
                "threads_per_process": 1,
                "meta_train_seconds": summary["meta_train_seconds"],
                "inner_steps": steps,
                "steps_per_second": steps / summary["meta_train_seconds"],
            }
        )
    speedup = records[1]["steps_per_second"] / records[0]["steps_per_second"]
    lines = [
        f"{args.family}, meta-batch {args.meta_batch}, {args.iterations} iterations, "
        "1 thread per process",
        "",
        "| processes | inner steps/s |",
        "| ---: | ---: |",
    ]
    lines += [f"| {r['processes']} | {r['steps_per_second']:.1f} |" for r in records]
    lines += ["", f"2 processes / 1 process: {speedup:.2f}x"]
    write_results(out, records, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
