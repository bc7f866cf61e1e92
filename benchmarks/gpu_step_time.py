"""Benchmark: the optimizer step on a CUDA GPU, against ``torch.optim.AdamW(fused=True)``.

The rule of ``"general-v4"`` (``LSTMOptimizer(weights="general-v4")``: the default's rule
without Muon's direction for matrices, which the GPU step computes in the rule's forward) on
CUDA tensors, side by
side in one run with ``AdamW(fused=True)`` and ``AdamW(foreach=True)``:

- one flat tensor of 1M, 10M and 100M parameters;
- the parameter list of a 12-layer transformer of GPT-2 small's shapes (124M parameters in 148
  tensors: embeddings, per layer the attention and MLP matrices, their biases and two LayerNorms);

for the step through the Triton kernel (:mod:`learned_opt.kernels.corrected_adam_triton`), the
same with bfloat16 state, and the rule's PyTorch forward (``LEARNED_OPT_NO_TRITON=1``, the path
GPU tensors took before the kernel). Each step is timed with CUDA events (median of the timed
steps after warm-up steps; gradients fixed and random). The memory floor of each optimizer is
its bytes moved per parameter (state read and written, gradient read, parameter read and
written) over this GPU's measured copy bandwidth (bytes read + written per second of a large
device-to-device copy). Reported: milliseconds per step, the ratio to fused AdamW, and the ratio
to the optimizer's own memory floor.

    python benchmarks/gpu_step_time.py --out benchmarks/results/gpu_step_time
    python benchmarks/gpu_step_time.py --smoke --out /tmp/smoke   # small sizes, few steps
    python benchmarks/gpu_step_time.py --sweep --out DIR          # the kernel's block and warps

``--sweep`` times the default rule's step at 10M and 100M parameters for each block size, number
of warps and precision of the gate products of the step kernel (``BLOCK``, ``NUM_WARPS``,
``DOT_PRECISION`` of the kernel's module), instead.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from collections.abc import Callable

import torch

from learned_opt import LSTMOptimizer
from learned_opt.report import write_results

#: The gate products' precisions ``--sweep`` compares (``tl.dot``'s ``input_precision``).
PRECISIONS = ("ieee", "tf32x3")


def gpt2_shapes(layers: int = 12, width: int = 768, vocab: int = 50257, context: int = 1024):
    """Parameter shapes of a GPT-2-small-like transformer (tied embedding counted once)."""
    shapes = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [(width,), (width,)]  # LayerNorm
        shapes += [(width, 3 * width), (3 * width,), (width, width), (width,)]  # attention
        shapes += [(width,), (width,)]  # LayerNorm
        shapes += [(width, 4 * width), (4 * width,), (4 * width, width), (width,)]  # MLP
    return shapes + [(width,), (width,)]


def copy_bandwidth(device: torch.device, numel: int = 1 << 28) -> float:
    """Bytes read + written per second of a large device-to-device copy (best of 10)."""
    src = torch.empty(numel, device=device)
    dst = torch.empty_like(src)
    best = min(_cuda_time(lambda: dst.copy_(src)) for _ in range(10))
    return 2 * numel * 4 / best


def _cuda_time(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def state_bytes(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> float:
    """Bytes per parameter moved by one step at the least: the per-coordinate state read and
    written, the gradient read, the parameter read and written."""
    n = sum(p.numel() for p in params)
    state = 0
    for p in params:
        for v in opt.state[p].values():
            # per coordinate: (numel, ...) as the rules keep it, or the parameter's shape
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.numel() >= p.numel() > 1:
                state += v.numel() * v.element_size()
    return 2 * state / n + 3 * 4


#: The rule timed: the default's, with Adam's direction for every tensor (the Triton kernels').
WEIGHTS = "general-v4"


def make_optimizer(name: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if name == "adamw-fused":
        return torch.optim.AdamW(params, lr=1e-3, fused=True)
    if name == "adamw-foreach":
        return torch.optim.AdamW(params, lr=1e-3, foreach=True)
    if name == "lstm-optimizer":
        return LSTMOptimizer(params, weights=WEIGHTS)
    if name == "lstm-optimizer-bf16-state":
        return LSTMOptimizer(params, weights=WEIGHTS, state_dtype=torch.bfloat16)
    if name == "lstm-optimizer-forward":
        return LSTMOptimizer(params, weights=WEIGHTS)
    raise ValueError(name)


def time_steps(name: str, shapes, device, warmup: int, steps: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device, generator=gen)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=gen) * 1e-2
    if name == "lstm-optimizer-forward":
        os.environ["LEARNED_OPT_NO_TRITON"] = "1"
    try:
        opt = make_optimizer(name, params)
        for _ in range(warmup):
            opt.step()
        torch.cuda.synchronize()
        times = [_cuda_time(opt.step) for _ in range(steps)]
        bytes_pp = state_bytes(opt, params)
        finite = all(bool(torch.isfinite(p).all()) for p in params)
    finally:
        os.environ.pop("LEARNED_OPT_NO_TRITON", None)
    peak = torch.cuda.max_memory_allocated(device)
    del opt, params
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return {"ms": 1e3 * statistics.median(times), "bytes_per_param": bytes_pp, "finite": finite,
            "peak_memory_gib": peak / 2**30}  # fmt: skip


def sweep(device: torch.device, warmup: int, steps: int, out: str) -> None:
    """Time the step kernel's configurations (see the module's docstring); writes ``out``."""
    from learned_opt.kernels import corrected_adam_triton as kernel

    default = kernel.BLOCK, kernel.NUM_WARPS, kernel.DOT_PRECISION
    cases = {"10M": [(10 * (1 << 20),)], "100M": [(100 * (1 << 20),)]}
    configs = [(p, b, w) for p in PRECISIONS for b in (32, 64, 128, 256) for w in (1, 2, 4, 8)]
    records = []
    try:
        for precision, block, warps in configs:
            kernel.BLOCK, kernel.NUM_WARPS, kernel.DOT_PRECISION = block, warps, precision
            config = {"precision": precision, "block": block, "num_warps": warps}
            time_steps("lstm-optimizer", [(10_000,)], device, 1, 1)  # compiles it
            if kernel._FAILED is not None:  # does not compile or launch: recorded, skipped
                records.append({**config, "failed": kernel._FAILED})
                kernel._FAILED = None
                continue
            for case, shapes in cases.items():
                timed = time_steps("lstm-optimizer", shapes, device, warmup, steps)
                records.append({**config, "case": case, **timed})
    finally:
        kernel.BLOCK, kernel.NUM_WARPS, kernel.DOT_PRECISION = default
    lines = [
        f"Step kernel configurations ({torch.cuda.get_device_name(device)}; torch "
        f"{torch.__version__}; default rule; median of {steps} steps; ms per step)",
        "",
        "| gate products | block | warps | 10M | 100M |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for precision, block, warps in configs:
        key = precision, block, warps
        mine = [r for r in records if (r["precision"], r["block"], r["num_warps"]) == key]
        cells = {r.get("case"): r for r in mine}
        times = (
            "failed | failed" if "failed" in mine[0]
            else f"{cells['10M']['ms']:.3f} | {cells['100M']['ms']:.3f}"
        )  # fmt: skip
        lines.append(f"| {precision} | {block} | {warps} | {times} |")
    write_results(out, records, lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/gpu_step_time")
    parser.add_argument("--smoke", action="store_true", help="small sizes, few steps")
    parser.add_argument("--sweep", action="store_true", help="the step kernel's configurations")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    device = torch.device("cuda")
    if args.sweep:
        return sweep(device, 3, 10, args.out)
    if args.smoke:
        cases = {"100k": [(100_000,)], "mlp 1M": [(1000, 1000), (1000,)]}
        warmup, steps = 2, 3
    else:
        cases = {"1M": [(1 << 20,)], "10M": [(10 * (1 << 20),)], "100M": [(100 * (1 << 20),)],
                 "GPT-2 small (148 tensors)": gpt2_shapes()}  # fmt: skip
        warmup, steps = 5, 20
    bandwidth = copy_bandwidth(device)
    names = ["adamw-fused", "adamw-foreach", "lstm-optimizer", "lstm-optimizer-bf16-state",
             "lstm-optimizer-forward"]  # fmt: skip
    records = []
    for case, shapes in cases.items():
        numel = sum(torch.Size(s).numel() for s in shapes)
        base = None
        for name in names:
            if name == "lstm-optimizer-forward" and numel > 20_000_000:
                continue  # its temporaries take minutes of warm-up at this size; see 10M
            r = time_steps(name, shapes, device, warmup, steps)
            floor_ms = 1e3 * r["bytes_per_param"] * numel / bandwidth
            base = r["ms"] if name == "adamw-fused" else base
            ratios = {"vs_adamw_fused": r["ms"] / base, "vs_floor": r["ms"] / floor_ms}
            records.append({"case": case, "params": numel, "tensors": len(shapes),
                            "optimizer": name, **r, "floor_ms": floor_ms, **ratios})  # fmt: skip
    gpu = torch.cuda.get_device_name(device)
    lines = [
        f"GPU step time ({gpu}; torch {torch.__version__}; host {platform.processor() or '?'}; "
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s read + write; median of {steps} steps)",
        "",
        "| parameters | optimizer | ms / step | x fused AdamW | bytes / param | floor ms | x floor "
        "| peak GiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in records:
        lines.append(
            f"| {r['case']} | {r['optimizer']} | {r['ms']:.3f} | {r['vs_adamw_fused']:.2f} | "
            f"{r['bytes_per_param']:.0f} | {r['floor_ms']:.3f} | {r['vs_floor']:.2f} | "
            f"{r['peak_memory_gib']:.2f} |"
        )
    write_results(args.out, records, lines)


if __name__ == "__main__":
    main()
