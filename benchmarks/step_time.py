"""Benchmark: optimizer step time and state memory, against Adam, a naive nn.LSTMCell step, and
the compute floor of the 2x20 LSTM.

For MLPs of about 10k, 100k, 1M and 10M parameters (several tensors each), measured side by side
in one run: the median wall time of ``opt.step()`` for ``torch.optim.Adam``, ``LSTMOptimizer``,
and a straightforward coordinatewise LSTM step built from ``nn.LSTMCell`` (what typical
reimplementations of the paper do); and the compute floor = the rule's matrix-multiply FLOPs per
step / this machine's fp32 matrix-multiply rate, measured here on the rule's own shapes.
Also the same ``LSTMOptimizer`` with its LSTM states stored in bfloat16
(``state_dtype=torch.bfloat16``, computed in fp32): step time and state bytes per parameter.
Prints a table with ratios; writes JSONL records.

    python benchmarks/step_time.py --out benchmarks/results/step_time
    python benchmarks/step_time.py --smoke --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from learned_opt import LSTMOptimizer, LSTMRule
from learned_opt.preprocess import log_sign
from learned_opt.report import write_results

SIZES = {"10k": (80, 64), "100k": (280, 210), "1M": (900, 650), "10M": (2800, 2100)}


def mlp(width: int, hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(width, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


class NaiveLSTMStep(torch.optim.Optimizer):
    """The usual reimplementation: two nn.LSTMCell and a Linear, one parameter at a time."""

    def __init__(self, params, hidden: int = 20) -> None:
        super().__init__(params, {})
        self.cell1, self.cell2 = nn.LSTMCell(2, hidden), nn.LSTMCell(hidden, hidden)
        self.out = nn.Linear(hidden, 1)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    z = torch.zeros(p.numel(), self.cell1.hidden_size)
                    st.update(h1=z, c1=z.clone(), h2=z.clone(), c2=z.clone())
                x = log_sign(p.grad.reshape(-1))
                st["h1"], st["c1"] = self.cell1(x, (st["h1"], st["c1"]))
                st["h2"], st["c2"] = self.cell2(st["h1"], (st["h2"], st["c2"]))
                p.add_(0.1 * self.out(st["h2"]).view_as(p))


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (state allocation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def optimizer_state_bytes(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for p in params for t in opt.state[p].values())


def matmul_rate(rows: int = 16384) -> float:
    """fp32 FLOP/s of the rule's own matrix products ((rows x 40) @ (40 x 80))."""
    a, b, c = torch.randn(rows, 40), torch.randn(40, 80), torch.empty(rows, 80)
    t = median_time(lambda: torch.mm(a, b, out=c), 20)
    return 2 * rows * 40 * 80 / t


def rule_flops(rule: LSTMRule) -> int:
    """Matrix-multiply FLOPs per coordinate per step (gates of every layer, and the read-out)."""
    h, flops, n_in = rule.hidden_size, 0, 2
    for _ in range(rule.num_layers):
        flops += 2 * (n_in + h) * 4 * h
        n_in = h
    return flops + 2 * h


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sizes", default="10k,100k,1M,10M")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--naive-max", type=float, default=2e6, help="skip naive above this size")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.repeats = "10k", 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rate = matmul_rate()
    rule = LSTMRule()
    records = []
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 matmul rate on "
        f"the rule's shapes: {rate / 1e9:.1f} GFLOP/s; rule: {rule_flops(rule)} FLOPs/coord",
        "",
        "| size | params | tensors | Adam ms | LSTMOptimizer ms | naive LSTMCell ms | "
        "floor ms | LSTMOpt / floor | naive / LSTMOpt | LSTMOpt / Adam | state bytes/param | "
        "bf16 state ms | bf16 / fp32 state time | bf16 state bytes/param |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]
    for size in args.sizes.split(","):
        torch.manual_seed(0)
        model = mlp(*SIZES[size])
        params = list(model.parameters())
        n = sum(p.numel() for p in params)
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        times = {}
        opts = {
            "adam": torch.optim.Adam(params, lr=1e-3),
            "lstm_optimizer": LSTMOptimizer(params, weights=rule),
            "lstm_optimizer_bf16_state": LSTMOptimizer(
                params, weights=rule, state_dtype=torch.bfloat16
            ),
        }
        if n <= args.naive_max:
            opts["naive_lstmcell"] = NaiveLSTMStep(params)
        for name, opt in opts.items():
            times[name] = median_time(opt.step, args.repeats)

        state_bytes = optimizer_state_bytes(opts["lstm_optimizer"], params)
        bf16_bytes = optimizer_state_bytes(opts["lstm_optimizer_bf16_state"], params)
        floor = n * rule_flops(rule) / rate
        rec = {
            "what": "step_time",
            "size": size,
            "params": n,
            "tensors": len(params),
            "seconds": times,
            "floor_seconds": floor,
            "matmul_flops_per_s": rate,
            "state_bytes_per_param": state_bytes / n,
            "bf16_state_bytes_per_param": bf16_bytes / n,
            "threads": torch.get_num_threads(),
        }
        records.append(rec)
        naive = times.get("naive_lstmcell")
        mine = times["lstm_optimizer"]
        bf16 = times["lstm_optimizer_bf16_state"]
        naive_ms = "-" if naive is None else f"{naive * 1e3:.1f}"
        naive_ratio = "-" if naive is None else f"{naive / mine:.2f}"
        lines.append(
            f"| {size} | {n} | {len(params)} | {times['adam'] * 1e3:.2f} | {mine * 1e3:.1f} | "
            f"{naive_ms} | {floor * 1e3:.1f} | {mine / floor:.2f} | {naive_ratio} | "
            f"{mine / times['adam']:.0f} | {state_bytes / n:.0f} | {bf16 * 1e3:.1f} | "
            f"{bf16 / mine:.2f} | {bf16_bytes / n:.0f} |"
        )
    write_results(out, records, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
