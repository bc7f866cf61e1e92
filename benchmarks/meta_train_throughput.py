"""Benchmark: meta-training throughput (inner steps per second) and peak memory on the paper's MNIST
task (784-20-10 sigmoid MLP, batch 128, 2x20 LSTM, first order), for truncation lengths K, with
gradient checkpointing off, on with one level of segments of ceil(sqrt(K)) steps ("sqrt") and on
with the default nested segments of
:func:`learned_opt.outer.grad_checkpoint.checkpoint_schedule` ("on", e.g. (25, 5, 1) for K = 100;
``--segment 10,1`` overrides them), side by side in one run. Each row also gives the exact
recomputation of its schedule (:func:`learned_opt.outer.grad_checkpoint.schedule_cost`): inner
steps re-run per inner step of the forward pass.

Each configuration runs in a fresh subprocess, so that its peak resident memory is its own. The
peak is the process's RSS high-water mark (``VmHWM``), reset just before the first unroll (after
the dataset is loaded and the kernels are compiled; where /proc is not writable, ``ru_maxrss``
since the process started). Two figures per run: the whole-process peak (it includes Python,
torch and the dataset, ~530 MB for MNIST here) and the growth = that peak minus the RSS just
before the first unroll, i.e. what meta-training itself added.

Each configuration also runs with ``MALLOC_MMAP_THRESHOLD_=131072``: glibc's allocator keeps
freed memory in its heap for reuse, and with the activations of K inner steps freed and
reallocated segment after segment (checkpointing), its heap fragments and the RSS stays well above
the live memory; with every allocation of 128 KiB or more in its own mapping, freed tensors go
back to the OS at once (at the cost of page faults, which the timings of those rows include).
Also measured: the same unroll with the fused kernels disabled (the pure-PyTorch path).

    python benchmarks/meta_train_throughput.py --out benchmarks/results/meta_train_throughput
    python benchmarks/meta_train_throughput.py --smoke --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

from learned_opt.report import write_results

PINNED = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _rss_mb(field: str) -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def _reset_peak() -> bool:
    """Reset this process's RSS high-water mark (Linux); whether that worked."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _rss_mb("VmHWM") is not None


def worker(
    family: str, truncation: int, steps: int, threads: int, seconds: float, segment: tuple[int, ...]
) -> dict:
    import torch

    from learned_opt import LSTMRule, OptimizerLearner, kernels, make_family
    from learned_opt.outer import unroll

    torch.set_num_threads(threads)
    fam = make_family(family)
    learner = OptimizerLearner(LSTMRule())
    opt = torch.optim.Adam(learner.parameters(), lr=1e-4)
    kernels.available()  # compile/load before timing
    if _reset_peak():
        method = "VmHWM, reset before the first unroll"
        base = _rss_mb("VmRSS")
    else:
        method = "ru_maxrss since process start"
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def one_task(seed: int) -> int:
        task = fam.sample(torch.Generator().manual_seed(seed))
        done = 0
        for w in unroll(
            learner,
            task,
            torch.Generator().manual_seed(seed),
            horizon=steps,
            truncation=truncation,
            checkpoint_segment=segment or None,
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
    if method.startswith("VmHWM"):
        peak = _rss_mb("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "steps_per_second": done / seconds,
        "inner_steps": done,
        "peak_rss_mb": peak,
        "base_rss_mb": base,
        "peak_minus_base_mb": peak - base,
        "memory_method": method,
        "fused_kernels": kernels.available(),
    }


ALLOCATORS = {"glibc default": {}, "MALLOC_MMAP_THRESHOLD_=131072": PINNED}
MODES = ("off", "sqrt", "on")


def _ratio(records: list[dict], lo: int, hi: int, key: str) -> str:
    by_k = {r["truncation"]: r[key] for r in records}
    a, b = by_k.get(lo), by_k.get(hi)
    return "-" if a is None or b is None or a <= 0 else f"{b / a:.2f}x"


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip() and int(x) > 0)


def _label(segment: tuple[int, ...] | None) -> str:
    if not segment:
        return "off"
    return f"S = {segment[0]}" if len(segment) == 1 else f"S = ({', '.join(map(str, segment))})"


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--family", default="mnist")
    parser.add_argument("--ks", default="5,20,100")
    parser.add_argument("--horizon", type=int, default=100, help="inner steps per task (T)")
    parser.add_argument(
        "--checkpoint",
        default="off,sqrt,on",
        help="gradient checkpointing modes: off; sqrt (one level, S = ceil(sqrt(K))); on (nested "
        "segments of checkpoint_schedule(K), or --segment)",
    )
    parser.add_argument(
        "--segment", default=None, help='segments of the "on" mode, e.g. 10 or 25,5,1'
    )
    parser.add_argument("--kernels", default="fused,pytorch", help="fused, pytorch or both")
    parser.add_argument(
        "--allocators",
        default="default,pinned",
        help="glibc default and/or pinned (MALLOC_MMAP_THRESHOLD_=131072, fused kernels only)",
    )
    parser.add_argument("--threads", type=int, default=None, help="default: torch's default")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per config")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        fam, k, steps, threads, seconds, segment = args.worker
        res = worker(fam, int(k), int(steps), int(threads), float(seconds), _sizes(segment))
        print(json.dumps(res))
        return 0
    if args.smoke:
        args.family, args.ks, args.horizon, args.seconds = "digits", "5", 10, 0.2
        args.kernels, args.allocators = "fused", "default"
    import torch

    from learned_opt.outer.grad_checkpoint import checkpoint_schedule, schedule_cost, sqrt_segment

    threads = args.threads or torch.get_num_threads()
    ks = [int(x) for x in args.ks.split(",")]
    modes = [m.strip() for m in args.checkpoint.split(",")]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown --checkpoint modes {sorted(unknown)}; expected {MODES}")
    configs = [(kind.strip(), "glibc default") for kind in args.kernels.split(",")]
    if "default" not in args.allocators:
        configs = []
    if "pinned" in args.allocators:
        configs.append(("fused", "MALLOC_MMAP_THRESHOLD_=131072"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def segments(k: int, mode: str) -> tuple[int, ...]:
        if mode == "sqrt":
            return (sqrt_segment(k),)
        if mode == "on":
            return _sizes(args.segment) if args.segment else checkpoint_schedule(k)
        return ()

    def measure(k: int, mode: str, fused: bool, allocator: str) -> dict:
        segment = segments(k, mode)
        env = {**os.environ, **ALLOCATORS[allocator]}
        if not fused:
            env["LEARNED_OPT_NO_EXT"] = "1"
        cmd = [sys.executable, __file__, "--out", str(out), "--worker", args.family, str(k)]
        cmd += [str(args.horizon), str(threads), str(args.seconds)]
        cmd += [",".join(map(str, segment)) or "0"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            raise RuntimeError(f"worker failed: {' '.join(cmd)}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        cost = schedule_cost(k, segment) if segment else {"recomputed": 0, "max_checkpoints": 0}
        return {
            "what": "meta_train_throughput",
            "family": args.family,
            "horizon": args.horizon,
            "truncation": k,
            "checkpoint": mode,
            "checkpoint_segment": list(segment) or None,
            "recomputed_per_step": cost["recomputed"] / k,
            "max_checkpoints": cost["max_checkpoints"],
            "threads": threads,
            "fused_requested": fused,
            "allocator": allocator,
            **res,
        }

    records: list[dict] = []
    lines = [
        f"{args.family}, first-order, horizon {args.horizon}, {threads} threads, "
        f"torch {torch.__version__}; memory: resident set size (RSS) of a fresh process per row",
        "",
        "| K | checkpoint | kernels | allocator | inner steps/s | vs off | peak RSS MB | growth MB "
        "| re-runs per step | states kept |",
        "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for k in ks:
        for mode in modes:
            for kind, allocator in configs:
                rec = measure(k, mode, kind == "fused", allocator)
                records.append(rec)
                off = [
                    r
                    for r in records
                    if r["truncation"] == k
                    and r["checkpoint"] == "off"
                    and r["fused_requested"] == rec["fused_requested"]
                    and r["allocator"] == allocator
                ]
                rel = f"{rec['steps_per_second'] / off[0]['steps_per_second']:.2f}x" if off else "-"
                seg = rec["checkpoint_segment"]
                kern = "fused" if rec["fused_kernels"] else "pytorch"
                lines.append(
                    f"| {k} | {_label(seg)} | {kern} | {allocator} | "
                    f"{rec['steps_per_second']:.1f} | {rel} | {rec['peak_rss_mb']:.0f} | "
                    f"{rec['peak_minus_base_mb']:.0f} | {rec['recomputed_per_step']:.2f} | "
                    f"{rec['max_checkpoints'] or '-'} |"
                )
    lines += [
        "",
        "growth = peak RSS minus the RSS just before the first unroll (what meta-training added); "
        f"memory measured as: {records[0]['memory_method']}; vs off = inner steps/s relative to "
        "checkpointing off (same K, kernels and allocator); re-runs per step and states kept "
        "(at most, per window) count the schedule exactly "
        "(learned_opt.outer.grad_checkpoint.schedule_cost)",
    ]
    if len(ks) > 1:
        lo, hi = min(ks), max(ks)
        lines += ["", f"Peak memory at K = {hi} / at K = {lo}:", ""]
        lines += ["| checkpoint | kernels | allocator | whole-process peak | growth |"]
        lines += ["| --- | --- | --- | ---: | ---: |"]
        names = {
            "off": "off",
            "sqrt": "S = ceil(sqrt(K))",
            "on": f"S = {args.segment}" if args.segment else "checkpoint_schedule(K)",
        }
        for mode in modes:
            for kind, allocator in configs:
                sel = [
                    r
                    for r in records
                    if r["checkpoint"] == mode
                    and r["fused_requested"] == (kind == "fused")
                    and r["allocator"] == allocator
                ]
                lines.append(
                    f"| {names[mode]} | {kind} | {allocator} | "
                    f"{_ratio(sel, lo, hi, 'peak_rss_mb')} | "
                    f"{_ratio(sel, lo, hi, 'peak_minus_base_mb')} |"
                )
    write_results(out, records, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
