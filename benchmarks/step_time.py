"""Benchmark: optimizer step time against the rule's own floor, and against Adam.

**The default rule** (``LSTMOptimizer()``: the LSTM-corrected Adam rule, shipped weights
``"general-v7"``, without ``total_steps``; a flat tensor is a vector, which takes Adam's
direction: ``benchmarks/matrix_step_time.py`` times matrices) on one flat tensor of 1M and
10M parameters, with 1
and 2 threads (``torch.set_num_threads``), side by side with ``torch.optim.Adam`` in the same
run. Its floor is derived here from the rule's math and this machine's measured rates:

- FLOPs per parameter, counted from the rule (:func:`rule_flops`): the LSTM's gate product
  ``[x, h] (in + H) x 4H`` and bias, the cell's nonlinearities and update, the read-out, and the
  Adam, feature and adaptation arithmetic; a tanh, sigmoid, exp or log counts as the 21 FLOPs of
  a float32 rational approximation (the fused kernel's tanh: x^2, a 6-term numerator, a 3-term
  denominator, one division), a square root as 1;
- bytes moved per parameter: the optimizer state read and written, the gradient read, the
  parameter read and written (:func:`rule_bytes`, from the live optimizer's state);
- the compute floor = FLOPs / the measured float32 rate of a matrix product of the gate
  product's shape class, ``(rows, in + H) x (in + H, 4H)`` (the best over a few row counts: on
  1M rows the product is bound by writing its 256 MB output, which is not arithmetic); the memory
  floor = bytes / the measured bandwidth of a large tensor copy (bytes read + written per
  second); the floor = the larger of the two.

Reported: the median step time, each floor, and step / floor, per size and thread count, and the
same step through the rule's PyTorch forward (the path the optimizer took before its fused
in-place step) for reference.

**The paper's 2x20 LSTM** (``LSTMRule``) on MLPs of about 10k, 100k, 1M and 10M parameters
(several tensors each): ``torch.optim.Adam``, ``LSTMOptimizer``, a straightforward
coordinatewise step built from ``nn.LSTMCell`` (what typical reimplementations of the paper do),
the compute floor of its matrix products, and its bfloat16-state variant.

Prints the tables; writes JSONL records and ``table.md``.

    python benchmarks/step_time.py --out benchmarks/results/step_time
    python benchmarks/step_time.py --smoke --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from learned_opt import LSTMCorrectedAdamRule, LSTMOptimizer, LSTMRule
from learned_opt.preprocess import log_sign
from learned_opt.report import write_results
from learned_opt.rules import corrected_adam_step

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


def paper_rule_flops(rule: LSTMRule) -> int:
    """Matrix-multiply FLOPs per coordinate per step (gates of every layer, and the read-out)."""
    h, flops, n_in = rule.hidden_size, 0, 2
    for _ in range(rule.num_layers):
        flops += 2 * (n_in + h) * 4 * h
        n_in = h
    return flops + 2 * h


#: FLOPs of one float32 tanh, sigmoid, exp or log evaluated to float32 accuracy by arithmetic: a
#: rational or polynomial approximation, e.g. the fused kernel's tanh: x^2 (1), a 6-term
#: numerator (6 fma = 12) times x (1), a 3-term denominator (3 fma = 6), one division (1).
NONLINEAR_FLOPS = 21


def rule_flops(rule: LSTMCorrectedAdamRule) -> dict[str, int]:
    """FLOPs per parameter of one step of the LSTM-corrected Adam rule, by part (its math as in
    ``LSTMCorrectedAdamRule.forward``; an fma counts 2)."""
    h, nl = rule.hidden_size, NONLINEAR_FLOPS
    n_out = rule.out_weight.shape[1]
    gates = 0
    for layer in range(rule.num_layers):
        k = (rule.in_size if layer == 0 else h) + h
        gates += 2 * k * 4 * h + 4 * h  # [x, h] @ W, + bias
    sigmoid = nl + 2  # 0.5 tanh(z / 2) + 0.5 (the halving is folded into the weights)
    cell = rule.num_layers * h * (3 * sigmoid + nl + 3 + nl + 1)  # i f o, g, c = f c + i g, h
    readout = 2 * h * n_out + 2 * n_out  # h @ w, + b, * 0.1
    k = len(rule.momentum_betas)
    adam = (
        5  # clipping: g^2, v / c and their sums, the factor
        + 3 * k  # momenta: lerp = sub + fma
        + k  # bias corrections
        + 4  # v = v b2 + (1 - b2) g g
        + 3  # D = sqrt(v) / c + eps
        + 5  # v_fast and its bias correction, sqrt
        + (1 + k)  # g / D, m_k / D
        + 2 * (nl + 3)  # the two log ratios: ratio, clamp, log, / p
        + 3  # Adam's direction -m / c / D
        + (nl + 2)
        + nl
        + 1  # a = A tanh(r / A), exp(a), d e^a
        + 7  # adaptation: -g p, g^2, p^2 and their sums
        + 2  # * e^s, * lr
    )
    return {"gates": gates, "cell": cell, "readout": readout, "adam_features_adaptation": adam}


def rule_bytes(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, float]:
    """Bytes moved per parameter by one step at the least: the per-coordinate state read and
    written, the gradient read, the parameter read and written."""
    n = p.numel()
    per_coordinate = [v for v in opt.state[p].values() if v.dim() >= 1 and v.shape[0] == n]
    state = sum(v.numel() * v.element_size() for v in per_coordinate) / n
    size = p.element_size()
    return {"state_read_write": 2 * state, "grad_read": size, "param_read_write": 2 * size}


def best_time(fn, repeats: int) -> float:
    fn()
    return min(_timed(fn) for _ in range(repeats))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _timed_cpu(fn) -> tuple[float, float]:
    """Wall time and this process's CPU time (all its threads) of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def gate_matmul_rate(rule: LSTMCorrectedAdamRule, threads: int) -> tuple[float, int]:
    """The best float32 rate (FLOP/s) of ``(rows, in + H) @ (in + H, 4H)`` over a few row counts,
    and the row count that gave it."""
    k, n = rule.in_size + rule.hidden_size, 4 * rule.hidden_size
    best = (0.0, 0)
    for rows in (4096 * threads, 16384 * threads, 65536 * threads):
        a, w, c = torch.randn(rows, k), torch.randn(k, n), torch.empty(rows, n)
        reps = max(3, int(2e8 / (2 * rows * k * n)))
        t = best_time(lambda a=a, w=w, c=c, r=reps: [torch.mm(a, w, out=c) for _ in range(r)], 5)
        t /= reps
        best = max(best, (2 * rows * k * n / t, rows))
    return best


def copy_bandwidth(megabytes: int = 512) -> float:
    """Bytes read + written per second by a large tensor copy."""
    src = torch.randn(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    t = best_time(lambda: dst.copy_(src), 5)
    return 2 * src.numel() * 4 / t


def measure(size: str, threads: int, args: argparse.Namespace, rate: float, rate_rows: int,
            bandwidth: float, measured_rate: float) -> tuple[dict, str]:  # fmt: skip
    """One size and thread count: the record and the table row (``rate``: the floor's matmul
    rate; ``measured_rate``: the rate measured with ``threads``)."""
    n = int(float(size.replace("M", "e6").replace("k", "e3")))
    torch.manual_seed(0)
    p_adam = torch.nn.Parameter(torch.zeros(n))
    p_lstm = torch.nn.Parameter(torch.zeros(n))
    grad = torch.randn(n) * 1e-3
    p_adam.grad, p_lstm.grad = grad.clone(), grad.clone()
    adam = torch.optim.Adam([p_adam], lr=1e-3)
    opt = LSTMOptimizer([p_lstm])
    rule = opt.rule.unwrapped  # (a schedule around it scales its step: one multiplication)
    flops = rule_flops(rule)
    for _ in range(2):  # warm-up: state allocation, first-step paths
        adam.step()
        opt.step()
    ref_state = {k: v.clone() for k, v in opt.state[p_lstm].items()}

    def forward() -> None:
        corrected_adam_step._forward_step_(rule, grad, ref_state)

    # Probes of the two rates, timed right before each step (paired: on a shared machine both
    # see the same load): one batch of the gate matmul, one large copy.
    k, cols = rule.in_size + rule.hidden_size, 4 * rule.hidden_size
    a, w, c = torch.randn(rate_rows, k), torch.randn(k, cols), torch.empty(rate_rows, cols)
    reps = max(3, int(2e8 / (2 * rate_rows * k * cols)))
    src = torch.randn(args.copy_mb * 2**20 // 4)
    dst = torch.empty_like(src)
    torch.mm(a, w, out=c)  # the probes' memory touched before the first timed repeat
    dst.copy_(src)
    flops_total, moved_total = sum(flops.values()) * n, sum(rule_bytes(opt, p_lstm).values()) * n
    paired: list[float] = []
    times: dict[str, list[float]] = {"adam": [], "lstm_optimizer": [], "forward": []}
    cpu: list[float] = []
    repeats = args.repeats if n < 5e6 else max(2, args.repeats // 2)
    for _ in range(repeats):  # interleaved: both see the same machine
        t_mm = _timed(lambda: [torch.mm(a, w, out=c) for _ in range(reps)]) / reps
        t_copy = _timed(lambda: dst.copy_(src))
        floor_i = max(
            flops_total * t_mm / (2 * rate_rows * k * cols),
            moved_total * t_copy / (8 * src.numel()),
        )
        times["adam"].append(_timed(adam.step))
        wall, used = _timed_cpu(opt.step)
        times["lstm_optimizer"].append(wall)
        cpu.append(used / threads)
        paired.append(wall / floor_i)
        if n <= args.forward_max:
            times["forward"].append(_timed(forward))
    med = {k: statistics.median(v) for k, v in times.items() if v}
    best = {k: min(v) for k, v in times.items() if v}
    moved = rule_bytes(opt, p_lstm)
    compute = flops_total / rate
    memory = sum(moved.values()) * n / bandwidth
    floor = max(compute, memory)
    # the floor at the rate measured with this thread count (no better than ideal scaling)
    measured_floor = max(flops_total / measured_rate, memory)
    step = med["lstm_optimizer"]
    step_cpu = statistics.median(cpu)
    rec = {
        "what": "default_rule_step_time",
        "params": n,
        "threads": threads,
        "seconds": med,
        "best_seconds": best,
        "seconds_all": times,
        "flops_per_param": flops,
        "bytes_per_param": moved,
        "state_bytes_per_param": moved["state_read_write"] / 2,
        "gate_matmul_flops_per_s": rate,
        "gate_matmul_rows": rate_rows,
        "copy_bytes_per_s": bandwidth,
        "compute_floor_seconds": compute,
        "memory_floor_seconds": memory,
        "floor_seconds": floor,
        "step_over_floor": step / floor,
        "gate_matmul_flops_per_s_measured": measured_rate,
        "measured_floor_seconds": measured_floor,
        "step_over_measured_floor": step / measured_floor,
        "best_step_over_floor": best["lstm_optimizer"] / floor,
        "paired_step_over_floor": statistics.median(paired),
        "paired_all": paired,
        "cpu_seconds_per_thread": step_cpu,
        "cpu_step_over_floor": step_cpu / floor,
        "step_over_adam": step / med["adam"],
        "load_average": os.getloadavg(),
    }
    fwd = med.get("forward")
    row = (
        f"| {size} | {threads} | {med['adam'] * 1e3:.2f} | {step * 1e3:.1f} | "
        f"{'-' if fwd is None else f'{fwd * 1e3:.0f}'} | "
        f"{compute * 1e3:.1f} | {memory * 1e3:.1f} | {floor * 1e3:.1f} | "
        f"**{step / floor:.2f}** | {measured_rate / 1e9:.0f} | {step / measured_floor:.2f} | "
        f"{statistics.median(paired):.2f} | "
        f"{step_cpu * 1e3:.1f} | {step_cpu / floor:.2f} | "
        f"{step / med['adam']:.0f} | {rate / 1e9:.0f} | {bandwidth / 1e9:.1f} | "
        f"{moved['state_read_write'] / 2:.0f} |"
    )
    return rec, row


def default_section(args: argparse.Namespace, records: list[dict], lines: list[str]) -> None:
    """The default rule on one flat tensor, against its floor and Adam, per size and threads."""
    rows = []
    single_rate = 0.0
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        rate, rate_rows = gate_matmul_rate(LSTMCorrectedAdamRule(), threads)
        if threads == 1:
            single_rate = rate
        # The floor is a lower bound: with several threads, the measured rate or the measured
        # one-thread rate times the threads, whichever is higher (a multi-threaded measurement
        # on a shared machine can fall far below the cores' capability).
        measured_rate, rate = rate, max(rate, threads * single_rate)
        bandwidth = copy_bandwidth(args.copy_mb)
        for size in args.sizes.split(","):
            rec, row = measure(size, threads, args, rate, rate_rows, bandwidth, measured_rate)
            records.append(rec)
            rows.append(row)
    last = records[-1]
    flops, moved = last["flops_per_param"], last["bytes_per_param"]
    lines += [
        "## The default rule (LSTMOptimizer(), the LSTM-corrected Adam rule) on one flat tensor",
        "",
        f"torch {torch.__version__}; {os.cpu_count()} CPUs; load average at the end "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} (other processes share the CPUs)",
        "",
        f"FLOPs per parameter: {sum(flops.values())} = "
        + " + ".join(f"{v} ({k})" for k, v in flops.items())
        + f"; a tanh, sigmoid, exp or log counts {NONLINEAR_FLOPS}.",
        f"Bytes per parameter: {sum(moved.values()):.0f} = "
        + " + ".join(f"{v:.0f} ({k})" for k, v in moved.items())
        + ".",
        "Floor = max(FLOPs / gate-matmul rate, bytes / copy bandwidth), both measured in this "
        "run with the row's thread count (best of 5: the machine's capability; the matmul rate "
        "with 2 threads at least twice the 1-thread rate). Measured floor: the same with the "
        "matmul rate measured with the row's thread count (the machine's own scaling). "
        "Step times: medians of the "
        "interleaved repeats. Paired: the median over the repeats of step / floor with the "
        "floor's two rates probed right before that step (the same load on a shared machine). "
        "Forward: the same step through the rule's PyTorch forward (the optimizer's former "
        "path). CPU ms: the step's CPU time per thread (other processes' time slices do not "
        "count, their use of the caches and memory does).",
        "",
        "| params | threads | Adam ms | LSTMOptimizer ms | forward ms | compute floor ms | "
        "memory floor ms | floor ms | LSTMOpt / floor | measured matmul GFLOP/s | "
        "LSTMOpt / measured floor | paired | CPU ms | CPU / floor | "
        "LSTMOpt / Adam | matmul GFLOP/s | copy GB/s | state bytes/param |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
    ]


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sizes", default="1M,10M", help="default rule: flat tensor sizes")
    parser.add_argument("--threads", default="1,2", help="default rule: thread counts")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--forward-max", type=float, default=2e6,
                        help="time the PyTorch forward path up to this size")  # fmt: skip
    parser.add_argument("--copy-mb", type=int, default=512)
    parser.add_argument("--paper-sizes", default="10k,100k,1M,10M")
    parser.add_argument("--naive-max", type=float, default=2e6, help="skip naive above this size")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.threads, args.repeats, args.copy_mb = "100k", "1", 2, 64
        args.paper_sizes = "10k"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    records: list[dict] = []
    lines: list[str] = []
    try:
        default_section(args, records, lines)
    finally:
        torch.set_num_threads(threads)
    args.repeats = min(args.repeats, 5)
    paper_section(args, records, lines)
    write_results(out, records, lines)
    return 0


def paper_section(args: argparse.Namespace, records: list[dict], lines: list[str]) -> None:
    """The paper's 2x20 LSTM on MLPs (several tensors), with the thread count torch starts with."""
    rate = matmul_rate()
    rule = LSTMRule()
    lines += [
        "## The paper's 2x20 LSTM (LSTMRule) on MLPs",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 matmul rate on "
        f"the rule's shapes: {rate / 1e9:.1f} GFLOP/s; rule: {paper_rule_flops(rule)} FLOPs/coord",
        "",
        "| size | params | tensors | Adam ms | LSTMOptimizer ms | naive LSTMCell ms | "
        "floor ms | LSTMOpt / floor | naive / LSTMOpt | LSTMOpt / Adam | state bytes/param | "
        "bf16 state ms | bf16 / fp32 state time | bf16 state bytes/param |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]
    for size in args.paper_sizes.split(","):
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
        floor = n * paper_rule_flops(rule) / rate
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


if __name__ == "__main__":
    raise SystemExit(run())
