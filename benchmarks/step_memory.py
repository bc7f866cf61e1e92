"""Benchmark: the memory one optimizer step takes beyond its parameters, gradients and state.

For each parameter dtype (float32, bfloat16, float16, float64) and layout (a vector, which
takes Adam's direction, and a matrix of 1,000 columns, which takes Muon's), ``torch.optim.Adam``
and ``LSTMOptimizer()`` (the shipped default) step one tensor of ``--numel`` coordinates, side by
side in one run, each in a fresh process. After two steps (the state exists), the third step's
peak resident memory above the memory before it is sampled from ``/proc/self/statm`` every half
millisecond, with glibc returning large blocks to the system at once
(``MALLOC_MMAP_THRESHOLD_=65536``), so that a temporary shows while it lives and the peak is not
an earlier step's. Reported per coordinate: that peak (the step's temporaries and its returned
update), the optimizer state's bytes (``element_size() * numel()`` of every tensor in
``opt.state``), and the step's time. Linux only.

    python benchmarks/step_memory.py --out benchmarks/results/step_memory
    python benchmarks/step_memory.py --smoke --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

DTYPES = ("float32", "bfloat16", "float16", "float64")
LAYOUTS = ("vector", "matrix")
OPTIMIZERS = ("Adam", "LSTMOptimizer")


def measure(optimizer: str, dtype_name: str, layout: str, numel: int) -> dict[str, Any]:
    """One configuration, measured in this process (see the module's docstring)."""
    import torch

    import learned_opt

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    shape = (numel,) if layout == "vector" else (max(1, numel // 1000), 1000)
    p = torch.nn.Parameter(torch.randn(shape, dtype=dtype))
    if optimizer == "Adam":
        opt: torch.optim.Optimizer = torch.optim.Adam([p], lr=1e-3)
    else:
        opt = learned_opt.LSTMOptimizer([p])
    page = os.sysconf("SC_PAGE_SIZE")

    def resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    for _ in range(2):
        p.grad = torch.randn_like(p)
        opt.step()
    p.grad = torch.randn_like(p)
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident())
            time.sleep(0.0005)

    before = resident()
    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    opt.step()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    state = sum(
        v.element_size() * v.numel()
        for s in opt.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    return {
        "optimizer": optimizer,
        "dtype": dtype_name,
        "layout": layout,
        "numel": p.numel(),
        "step_peak_bytes_per_param": max(0, peak[0] - before) / p.numel(),
        "state_bytes_per_param": state / p.numel(),
        "step_seconds": seconds,
    }


def run_child(optimizer: str, dtype: str, layout: str, numel: int) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--child", optimizer, dtype, layout, str(numel)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=2_000_000, help="coordinates of the tensor")
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--out", default=None, help="folder for records.jsonl and table.md")
    ap.add_argument("--smoke", action="store_true", help="a tiny run (tests)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        optimizer, dtype, layout, numel = args.child
        print(json.dumps(measure(optimizer, dtype, layout, int(numel))))
        return 0
    if not os.path.exists("/proc/self/statm"):
        print("step_memory.py: needs Linux's /proc/self/statm", file=sys.stderr)
        return 2
    numel = 20_000 if args.smoke else args.numel
    dtypes = ("float32", "float16") if args.smoke else tuple(args.dtypes.split(","))
    unknown = sorted(set(dtypes) - set(DTYPES))
    if unknown:
        ap.error(f"unknown dtypes {unknown}; choose from {list(DTYPES)}")
    records = [
        run_child(o, d, layout, numel) for d in dtypes for layout in LAYOUTS for o in OPTIMIZERS
    ]
    by = {(r["optimizer"], r["dtype"], r["layout"]): r for r in records}
    lines = [
        f"# One step's peak memory beyond the state, {numel:,} coordinates, bytes per parameter",
        "",
        "| dtype | layout | Adam: step peak | LSTMOptimizer: step peak | Adam: state "
        "| LSTMOptimizer: state | LSTMOptimizer / Adam step time |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for d in dtypes:
        for layout in LAYOUTS:
            a, b = by["Adam", d, layout], by["LSTMOptimizer", d, layout]
            lines.append(
                f"| {d} | {layout} | {a['step_peak_bytes_per_param']:.0f} "
                f"| {b['step_peak_bytes_per_param']:.0f} | {a['state_bytes_per_param']:.1f} "
                f"| {b['state_bytes_per_param']:.1f} "
                f"| {b['step_seconds'] / max(a['step_seconds'], 1e-9):.1f} |"
            )
    if args.out:
        from learned_opt.report import write_results

        write_results(args.out, records, lines)
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
