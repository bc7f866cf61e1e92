"""Benchmark: the optimizer's step on a model of matrices, Muon's direction against Adam's.

``general-v6`` moves every parameter of 2 or more dimensions along Muon's orthogonalized
momentum (5 Newton-Schulz iterations per matrix per step, then the fused kernel); ``general-v5``
along Adam's; ``general-v7`` is ``general-v6`` with a learned per-tensor step-size control (a
71-weight MLP per tensor per step); ``general-v7, lstm=False`` is ``general-v7`` without its
per-coordinate LSTM (the shipped ``general-v7-lean``; PyTorch operations, no fused kernel). On
a 2-layer transformer encoder (``--d-model``, 4 heads, feed-forward 4x, batch 16 x 32 tokens),
side by side in one run, interleaved: ``torch.optim.Adam``, ``LSTMOptimizer`` with
``general-v5``, ``general-v6``, ``general-v7`` and ``general-v7, lstm=False`` (all told
``total_steps``). Reported per thread count: the optimizers' state in bytes per parameter, the
median ``opt.step()`` time, the forward + backward time, and the ratios of the steps and of
whole training steps to Adam's and to ``general-v5``'s.

    python benchmarks/matrix_step_time.py --out benchmarks/results/matrix_step_time
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from learned_opt import LSTMOptimizer
from learned_opt.report import write_results

OPTIMIZERS: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "general-v5": lambda p: LSTMOptimizer(p, weights="general-v5", total_steps=1000),
    "general-v6": lambda p: LSTMOptimizer(p, weights="general-v6", total_steps=1000),
    "general-v7": lambda p: LSTMOptimizer(p, weights="general-v7", total_steps=1000),
    "general-v7, lstm=False": lambda p: LSTMOptimizer(
        p, weights="general-v7-lean", total_steps=1000
    ),
}


def state_bytes(opt: torch.optim.Optimizer, params: int) -> float:
    """Bytes of the optimizer's state per parameter (every tensor in ``opt.state``)."""
    total = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))  # fmt: skip
    return total / params


def measure(d_model: int, threads: int, steps: int, rounds: int) -> dict[str, dict[str, float]]:
    """Median step and forward + backward milliseconds per optimizer, ``rounds`` interleaved
    rounds of ``steps`` steps (the first round's steps warm up and are dropped)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model, 4, 4 * d_model, batch_first=True)
    models = {name: torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
              for name in OPTIMIZERS}  # fmt: skip
    opts = {name: make(list(models[name].parameters())) for name, make in OPTIMIZERS.items()}
    x = torch.randn(16, 32, d_model)
    times: dict[str, dict[str, list[float]]] = {n: {"step": [], "fwd_bwd": []} for n in OPTIMIZERS}
    for r in range(rounds + 1):
        for name in OPTIMIZERS:
            for _ in range(steps):
                t0 = time.perf_counter()
                opts[name].zero_grad()
                models[name](x).pow(2).mean().backward()
                t1 = time.perf_counter()
                opts[name].step()
                t2 = time.perf_counter()
                if r > 0:
                    times[name]["fwd_bwd"].append(1e3 * (t1 - t0))
                    times[name]["step"].append(1e3 * (t2 - t1))
    params = sum(p.numel() for p in models["Adam"].parameters())
    return {
        name: {"params": params, "state_bytes": state_bytes(opts[name], params),
               **{k: statistics.median(v) for k, v in t.items()}}
        for name, t in times.items()
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--steps", type=int, default=5, help="steps per optimizer per round")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    records, lines = (
        [],
        [
            f"2-layer transformer encoder, d_model {args.d_model}, batch 16 x 32; medians of "
            f"{args.rounds} interleaved rounds of {args.steps} steps; torch {torch.__version__}",
            "",
            "| threads | params | optimizer | state bytes / param | step ms | fwd+bwd ms | "
            "step / Adam's | step / general-v5's | training step / general-v5's |",
            "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ],
    )
    for threads in (int(t) for t in args.threads.split(",")):
        found = measure(args.d_model, threads, args.steps, args.rounds)
        ref, adam = found["general-v5"], found["Adam"]
        for name, m in found.items():
            whole = (m["step"] + m["fwd_bwd"]) / (ref["step"] + ref["fwd_bwd"])
            records.append({"threads": threads, "optimizer": name, **m, "whole_vs_v5": whole})
            lines.append(
                f"| {threads} | {m['params']:,} | {name} | {m['state_bytes']:.1f} "
                f"| {m['step']:.1f} | {m['fwd_bwd']:.1f} "
                f"| {m['step'] / adam['step']:.1f} | {m['step'] / ref['step']:.2f} | {whole:.2f} |"
            )
    write_results(args.out, records, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
