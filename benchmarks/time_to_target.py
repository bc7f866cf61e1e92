"""Benchmark: wall-clock time to a tuned AdamW's loss, on a character-level transformer.

A GPT-style character language model (pre-LayerNorm transformer encoder layers with a causal
mask, learned positional embeddings, ``torch.nn`` modules) is trained on the offline corpus
(``learned_opt.corpus.load_corpus()``: train split for training, val split for the held-out
loss) with

(a) AdamW (betas 0.9/0.999, weight decay 0.01, constant learning rate) whose learning rate is
    tuned first: each learning rate of ``--lrs`` trains for ``--tune-steps`` steps and the one
    with the lowest validation loss is chosen, on validation batches of their own (not the
    ones the held-out losses are reported on); then it trains for ``--steps`` steps. A chosen
    rate that is the smallest or largest of the grid, where the best rate may lie outside it,
    is warned about (widen ``--lrs``) and flagged: ``lr_at_edge`` in tuned AdamW's record, "at
    the edge of the grid" in the table;
(b) ``learned_opt.LSTMOptimizer(params)``: the default weights, untuned (lr multiplier 1.0);
    with ``--total-steps``, ``LSTMOptimizer(params, total_steps=steps)`` (the default weights'
    warm-up and decay).

Both see the same initial weights and the same minibatches, and they train in lock-step (a step
of one, then a step of the other), so that other work on a shared machine slows both alike; each
run's clock counts its own steps only. The target is tuned AdamW's final
smoothed training loss (an exponential moving average of the minibatch loss, ``--ema``,
bias-corrected); reported are the step and the training wall-clock time (forward, backward and
optimizer step; evaluation excluded) at which each optimizer's smoothed loss first reaches it,
the final validation losses, and the optimizer's share of each step's time (``opt.step()``
timed apart from the forward and backward pass).

A run counts as reaching the target only if it keeps it: its ``target_status`` is

- ``reached``: its smoothed loss reaches the target, its training loss stays finite to the
  end and its final smoothed loss is at most ``--hold-margin`` (5%) above the target; then
  ``steps_to_target`` and ``seconds_to_target`` are the first step and time at the target;
- ``diverged``: its training loss became non-finite (the run stops there,
  ``diverged_at_step``), whether or not it had reached the target before;
- ``not held``: it reached the target but ends more than ``--hold-margin`` above it;
- ``not reached``: its smoothed loss never reaches the target.

For all but ``reached``, ``steps_to_target`` and ``seconds_to_target`` are null (a time to a
loss the run did not keep is no time to target); where the run did reach the target on the
way, ``first_reached_step`` and ``first_reached_seconds`` say when, and the table shows it
beside the status.

Writes ``records.jsonl`` (one summary record per run, tuning runs included), ``curves.jsonl``
(every step and every evaluation), ``table.md``, ``provenance.json``, ``loss_vs_time.png`` and
TensorBoard event files (``tensorboard/<run>/``).

Default sizes: 4 layers, d_model 256, 4 heads, context 128 (3.25M parameters), batch 16; 4 x 300
tuning steps, then 2000 steps each. Measured on 2 otherwise idle CPU cores of an AMD EPYC
(torch 2.13.0) with the default weights: about 275 ms per AdamW step and 530 ms per
LSTMOptimizer step (opt.step about 255 ms), so about 33 minutes in all. On a shared machine
these times vary up to tenfold (two threads on two busy cores): the lock-step keeps the
comparison fair, not the total short; ``--d-model 128 --batch 8`` (0.84M parameters) is three
to four times faster.

    python benchmarks/time_to_target.py --out benchmarks/results/time_to_target
    python benchmarks/time_to_target.py --smoke --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import learned_opt
from learned_opt.corpus import CharCorpus, load_corpus
from learned_opt.evaluate import Tuning
from learned_opt.report import write_jsonl, write_results

_DATA_STREAM = 1  # generator offset of the training minibatches
_VAL_STREAM = 2  # generator offset of the fixed validation batches (the reported losses)
_TUNE_STREAM = 3  # generator offset of the batches that choose AdamW's learning rate


class CharTransformer(nn.Module):
    """Token and learned positional embeddings, ``layers`` pre-LayerNorm transformer layers with
    a causal mask, a final LayerNorm and a linear read-out to the vocabulary."""

    def __init__(self, vocab: int, context: int, d_model: int, heads: int, layers: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model,
            heads,
            dim_feedforward=4 * d_model,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer(
            "mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False
        )

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.shape[1]
        h = self.tok(ids) + self.pos.weight[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    logits = model(x)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _val_batches(
    corpus: CharCorpus, args: argparse.Namespace, stream: int = _VAL_STREAM
) -> list[tuple[Tensor, Tensor]]:
    """``--eval-batches`` fixed batches of the corpus's validation split (``stream``: which)."""
    g = torch.Generator().manual_seed(args.seed * 1000 + stream)
    return [corpus.batch("val", args.batch, args.context, g) for _ in range(args.eval_batches)]


@torch.no_grad()
def _evaluate(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> float:
    model.eval()
    loss = sum(_loss(model, x, y).item() for x, y in batches) / len(batches)
    model.train()
    return loss if math.isfinite(loss) else float("inf")


def _model(corpus: CharCorpus, args: argparse.Namespace) -> CharTransformer:
    torch.manual_seed(args.seed)
    return CharTransformer(corpus.vocab_size, args.context, args.d_model, args.heads, args.layers)


class Run:
    """One training run: a fresh model (the same initial weights for every run), its optimizer,
    the minibatch stream (the same for every run), and what it has measured so far."""

    def __init__(
        self,
        name: str,
        make_opt: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
        steps: int,
        corpus: CharCorpus,
        val: list[tuple[Tensor, Tensor]],
        args: argparse.Namespace,
        curves: list[dict[str, Any]] | None = None,
        writer: Any = None,
    ) -> None:
        self.name, self.steps, self.corpus, self.val, self.args = name, steps, corpus, val, args
        self.curves, self.writer = curves, writer
        self.model = _model(corpus, args)
        self.opt = make_opt(list(self.model.parameters()))
        self.data = torch.Generator().manual_seed(args.seed * 1000 + _DATA_STREAM)
        self.ema = self.ema_weight = 0.0
        self.clock = 0.0
        self.fwd_bwd: list[float] = []
        self.opt_step: list[float] = []
        self.curve: list[tuple[int, float, float]] = []  # (step, training seconds, smoothed loss)
        self.evals: list[tuple[int, float, float]] = []
        self.diverged = False

    def step(self, k: int) -> None:
        """Step ``k`` (1-based): one minibatch, timed as forward+backward and ``opt.step()``."""
        if self.diverged:
            return
        args = self.args
        x, y = self.corpus.batch("train", args.batch, args.context, self.data)
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = _loss(self.model, x, y)
        loss.backward()
        t1 = time.perf_counter()
        self.opt.step()
        t2 = time.perf_counter()
        self.fwd_bwd.append(t1 - t0)
        self.opt_step.append(t2 - t1)
        self.clock += t2 - t0
        value = loss.item()
        if not math.isfinite(value):
            self.diverged = True
            return
        self.ema = args.ema * self.ema + (1 - args.ema) * value
        self.ema_weight = args.ema * self.ema_weight + (1 - args.ema)
        smoothed = self.ema / self.ema_weight
        self.curve.append((k, self.clock, smoothed))
        point: dict[str, Any] = {
            "run": self.name,
            "step": k,
            "time_s": round(self.clock, 4),
            "train_loss": round(value, 5),
            "train_loss_smoothed": round(smoothed, 5),
            "fwd_bwd_s": round(t1 - t0, 5),
            "opt_step_s": round(t2 - t1, 5),
        }
        if k % args.eval_every == 0 or k == self.steps:
            point["val_loss"] = round(_evaluate(self.model, self.val), 5)
            self.evals.append((k, self.clock, point["val_loss"]))
        if self.curves is not None:
            self.curves.append(point)
        if self.writer is not None:
            w = self.writer
            w.add_scalar("train/loss", value, k)
            w.add_scalar("train/loss_smoothed", smoothed, k)
            w.add_scalar("time/train_seconds", self.clock, k)
            w.add_scalar("time/opt_step_ms", 1e3 * (t2 - t1), k)
            w.add_scalar("time/fwd_bwd_ms", 1e3 * (t1 - t0), k)
            if "val_loss" in point:
                w.add_scalar("val/loss", point["val_loss"], k)
        if k % args.log_every == 0:
            print(
                f"[{self.name}] step {k}/{self.steps} loss {smoothed:.4f} ({self.clock:.0f} s; "
                f"per step: opt.step {1e3 * statistics.median(self.opt_step):.0f} ms, "
                f"fwd+bwd {1e3 * statistics.median(self.fwd_bwd):.0f} ms, medians)",
                flush=True,
            )

    def record(self) -> dict[str, Any]:
        """The run's summary (with its smoothed-loss curve against training time, ``curve``)."""
        done = len(self.curve)
        fwd_bwd, opt_step = sum(self.fwd_bwd), sum(self.opt_step)
        ok = done > 0 and not self.diverged
        return {
            "what": "time_to_target",
            "run": self.name,
            "steps": self.steps,
            "steps_done": done,
            "diverged": self.diverged,
            "diverged_at_step": done + 1 if self.diverged else None,
            "final_train_loss_smoothed": self.curve[-1][2] if ok else float("inf"),
            "final_val_loss": self.evals[-1][2] if ok and self.evals else float("inf"),
            "train_seconds": self.clock,
            "fwd_bwd_ms_per_step": 1e3 * fwd_bwd / max(len(self.fwd_bwd), 1),
            "opt_step_ms_per_step": 1e3 * opt_step / max(len(self.opt_step), 1),
            "fwd_bwd_ms_median": 1e3 * statistics.median(self.fwd_bwd or [0.0]),
            "opt_step_ms_median": 1e3 * statistics.median(self.opt_step or [0.0]),
            "opt_step_share": opt_step / max(opt_step + fwd_bwd, 1e-12),
            "params": sum(p.numel() for p in self.model.parameters()),
            "opt_state_bytes": _state_bytes(self.opt),
            "load_average_at_end": os.getloadavg()[0],
            "curve": self.curve,
            "evals": self.evals,
        }


def train_together(runs: list[Run], steps: int) -> list[dict[str, Any]]:
    """Train ``runs`` in lock-step (step k of each, in turn), so that whatever else loads the
    machine slows them alike; each run's clock counts only its own steps. Returns their
    records."""
    for k in range(1, steps + 1):
        for r in runs:
            r.step(k)
    return [r.record() for r in runs]


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.element_size() * v.numel()
        for s in opt.state.values()
        for v in s.values()
        if isinstance(v, Tensor)
    )


def _reach(curve: list[tuple[int, float, float]], target: float) -> tuple[int, float] | None:
    """The first (step, seconds) at which the smoothed loss is at or below ``target``."""
    return next(((k, t) for k, t, loss in curve if loss <= target), None)


def time_to_target(record: dict[str, Any], target: float, margin: float) -> dict[str, Any]:
    """Whether and when the run of ``record`` reaches ``target`` and keeps it (the module's
    rule): its ``target_status``, the step and seconds to the target (null unless
    ``reached``) and the first step and seconds at the target whatever the status (null if
    never). A non-finite ``target`` (tuned AdamW diverged) is no target: nothing reaches it."""
    hit = _reach(record["curve"], target) if math.isfinite(target) else None
    if record["diverged"]:
        status = "diverged"
    elif hit is None:
        status = "not reached"
    elif record["final_train_loss_smoothed"] > target * (1 + margin):
        status = "not held"
    else:
        status = "reached"
    counted = hit if status == "reached" else None
    return {
        "target_train_loss_smoothed": target,
        "target_hold_margin": margin,
        "target_status": status,
        "steps_to_target": counted[0] if counted else None,
        "seconds_to_target": counted[1] if counted else None,
        "first_reached_step": hit[0] if hit else None,
        "first_reached_seconds": hit[1] if hit else None,
    }


def _plot(runs: list[dict[str, Any]], target: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r, color in zip(runs, ("tab:blue", "tab:orange")):
        t = [c[1] / 60 for c in r["curve"]]
        ax.plot(t, [c[2] for c in r["curve"]], color=color, label=f"{r['label']}: train (EMA)")
        ax.plot(
            [e[1] / 60 for e in r["evals"]],
            [e[2] for e in r["evals"]],
            "o--",
            color=color,
            markersize=3,
            label=f"{r['label']}: validation",
        )
    if math.isfinite(target):  # (none if tuned AdamW diverged)
        ax.axhline(
            target, color="gray", linestyle=":", label="target: tuned AdamW's final train loss"
        )
    ax.set_xlabel("training wall-clock time (minutes; evaluation excluded)")
    ax.set_ylabel("cross-entropy (nats per character)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    curves = [r["curve"] for r in runs if r["curve"]]
    lo = min(min(c[2] for c in curve) for curve in curves)
    hi = max(curve[-1][2] for curve in curves)  # every run's end stays in view
    top = max(lo * 2.2, hi * 1.15, target * 1.6 if math.isfinite(target) else 0.0)
    ax.set_ylim(lo * 0.95, top)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=2000, help="steps of the compared runs")
    parser.add_argument("--tune-steps", type=int, default=300, help="steps of each tuning run")
    parser.add_argument("--lrs", default="3e-4,1e-3,3e-3,1e-2", help="AdamW learning rates")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights", default=None, help="LSTMOptimizer weights (default: shipped)")
    parser.add_argument(
        "--total-steps", action="store_true",
        help="tell the LSTMOptimizer the run's length (--steps), for weights that read it",
    )  # fmt: skip
    parser.add_argument("--ema", type=float, default=0.98, help="smoothing of the training loss")
    parser.add_argument(
        "--hold-margin", type=float, default=0.05,
        help="how far above the target (a fraction of it) a run may end and still count as "
        "having reached it",
    )  # fmt: skip
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few steps")
    args = parser.parse_args(argv)
    if not 0 <= args.hold_margin < math.inf:
        parser.error(f"--hold-margin must be a finite fraction >= 0, not {args.hold_margin}")
    if args.smoke:
        args.steps, args.tune_steps, args.lrs = 6, 3, "1e-3,1e-2"
        args.layers, args.d_model, args.heads, args.context, args.batch = 1, 32, 2, 16, 4
        args.eval_every, args.eval_batches, args.log_every = 3, 1, 3
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from torch.utils.tensorboard import SummaryWriter

    corpus = load_corpus()
    val = _val_batches(corpus, args)
    lrs = [float(v) for v in args.lrs.split(",")]
    setup = {
        "model": {
            "layers": args.layers,
            "d_model": args.d_model,
            "heads": args.heads,
            "context": args.context,
            "vocab": corpus.vocab_size,
        },
        "batch": args.batch,
        "seed": args.seed,
        "threads": args.threads,
        "ema": args.ema,
        "corpus_sha256": corpus.digest,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg()[0],
        # generator offsets of the validation batches: reported losses, AdamW's tuning
        "val_streams": {"reported": _VAL_STREAM, "tuning": _TUNE_STREAM},
    }
    records: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []

    def adamw(lr: float) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
        return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    # (a) AdamW: a learning rate per tuning run, chosen by the loss on validation batches of
    # their own, so that the held-out losses reported below are not those it was chosen on.
    tune_val = _val_batches(corpus, args, _TUNE_STREAM)
    tune = [
        Run(f"tune_adamw_lr{lr:g}", adamw(lr), args.tune_steps, corpus, tune_val, args)
        for lr in lrs
    ]
    for lr, rec in zip(lrs, train_together(tune, args.tune_steps)):
        rec.update(setup, optimizer="adamw", lr=lr, role="tuning")
        records.append(rec)
    del tune
    tuning = [r for r in records if r["role"] == "tuning"]
    best_lr = min(tuning, key=lambda r: (r["final_val_loss"], r["lr"]))["lr"]  # ties: the smallest
    scores = {r["lr"]: r["final_val_loss"] for r in tuning}
    lr_at_edge = Tuning(best_lr, scores, runs=[], grid=lrs).at_edge
    if lr_at_edge:
        print(
            f"warning: the best AdamW learning rate {best_lr:g} is at the edge of the grid "
            f"{lrs}; the best rate may lie outside it: widen --lrs",
            file=sys.stderr,
            flush=True,
        )

    # (a) tuned AdamW and (b) the learned optimizer, trained in lock-step.
    horizon = {"total_steps": args.steps} if args.total_steps else {}
    compared = {
        "adamw": (
            f"AdamW (lr {best_lr:g}, tuned" + (", at the edge of the grid)" if lr_at_edge else ")"),
            adamw(best_lr),
            best_lr,
        ),
        "lstm": (
            f"LSTMOptimizer ({args.weights or 'default'} weights, untuned"
            + (f", total_steps={args.steps})" if args.total_steps else ")"),
            lambda params: learned_opt.LSTMOptimizer(params, weights=args.weights, **horizon),
            1.0,
        ),
    }
    writers = {name: SummaryWriter(str(out / "tensorboard" / name)) for name in compared}
    both = [
        Run(name, make, args.steps, corpus, val, args, curves, writers[name])
        for name, (_, make, _) in compared.items()
    ]
    runs = train_together(both, args.steps)
    for w in writers.values():
        w.close()
    for rec, (label, _, lr) in zip(runs, compared.values()):
        rec.update(setup, optimizer=rec["run"], lr=lr, role="compared", label=label)
        # whether the tuned rate is at the edge of its grid (the learned optimizer is untuned)
        rec["lr_at_edge"] = lr_at_edge if rec["run"] == "adamw" else None
        records.append(rec)
    adam_run, lstm_run = runs
    target = adam_run["final_train_loss_smoothed"]
    for r in runs:
        r.update(time_to_target(r, target, args.hold_margin))
    params = adam_run["params"]
    title = (
        f"char transformer {args.layers}x{args.d_model} ({params / 1e6:.2f}M params), "
        f"batch {args.batch}x{args.context}, {args.threads} threads"
    )
    _plot(runs, target, out / "loss_vs_time.png", title)
    order = list(compared)
    curves.sort(key=lambda c: (order.index(c["run"]), c["step"]))  # stable: steps in order
    write_jsonl(out / "curves.jsonl", curves)

    def fmt(r: dict[str, Any], what: str, spec: str) -> str:
        """The run's ``steps`` or ``seconds`` to the target, or its status (and when it first
        reached the target, if it did)."""
        if r["target_status"] == "reached":
            return format(r[f"{what}_to_target"], spec)
        first = r["first_reached_step" if what == "steps" else "first_reached_seconds"]
        return r["target_status"] + ("" if first is None else f" (at {format(first, spec)})")

    lines = [
        f"{title}; {args.steps} steps each, same initial weights and minibatches.",
        f"AdamW lr tuned over {lrs} ({args.tune_steps} steps each, lowest validation loss): "
        + ", ".join(f"{r['lr']:g} -> {r['final_val_loss']:.4f}" for r in tuning)
        + f"; chosen {best_lr:g}"
        + (
            ", at the edge of the grid: the best rate may lie outside it (widen --lrs)."
            if lr_at_edge
            else "."
        ),
        f"Tuning took {sum(r['train_seconds'] for r in tuning):.0f} s of training time "
        "(not counted below).",
        f"Target: tuned AdamW's final smoothed training loss, {target:.4f} (EMA {args.ema}). "
        "A run counts as reaching it only if its loss stays finite and it ends at most "
        f"{args.hold_margin:.0%} above it; otherwise the table gives its status (diverged, "
        "not held, not reached) and when it first reached the target, if it did.",
        "",
        "| optimizer | final train loss (EMA) | final val loss | steps to target | "
        "time to target (s) | total train time (s) | opt.step ms/step (median) | "
        "fwd+bwd ms/step (median) | opt.step share of time | state bytes/param |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        lines.append(
            f"| {r['label']} | {r['final_train_loss_smoothed']:.4f} | {r['final_val_loss']:.4f} | "
            f"{fmt(r, 'steps', 'd')} | {fmt(r, 'seconds', '.0f')} | "
            f"{r['train_seconds']:.0f} | {r['opt_step_ms_per_step']:.1f} "
            f"({r['opt_step_ms_median']:.1f}) | {r['fwd_bwd_ms_per_step']:.1f} "
            f"({r['fwd_bwd_ms_median']:.1f}) | {r['opt_step_share']:.1%} | "
            f"{r['opt_state_bytes'] / r['params']:.0f} |"
        )
    lines.append("")
    status, first = lstm_run["target_status"], lstm_run["first_reached_step"]
    if not math.isfinite(target):
        lines.append("Tuned AdamW diverged (a non-finite training loss): there is no target.")
    elif status == "reached":
        lines.append(
            "LSTMOptimizer reaches the target in "
            f"{lstm_run['seconds_to_target'] / adam_run['seconds_to_target']:.2f}x tuned "
            f"AdamW's time ({lstm_run['steps_to_target'] / adam_run['steps_to_target']:.2f}x "
            "its steps)."
        )
    elif status == "diverged":
        lines.append(
            "LSTMOptimizer diverged (a non-finite training loss at step "
            f"{lstm_run['diverged_at_step']})"
            + ("" if first is None else f" after reaching the target at step {first}")
            + ": not counted as reaching it."
        )
    elif status == "not held":
        lines.append(
            f"LSTMOptimizer reaches the target at step {first} but does not hold it: it ends "
            f"at {lstm_run['final_train_loss_smoothed'] / target:.2f}x the target (more than "
            f"{args.hold_margin:.0%} above it), so it is not counted as reaching it."
        )
    else:
        hit = _reach(adam_run["curve"], lstm_run["final_train_loss_smoothed"])
        lines.append(
            f"LSTMOptimizer does not reach the target in {args.steps} steps: it ends at "
            f"{lstm_run['final_train_loss_smoothed'] / target:.2f}x the target, a loss tuned "
            + (f"AdamW reached at step {hit[0]}." if hit else "AdamW never had.")
        )
    for r in records:  # curves live in curves.jsonl; the summary keeps the evaluations
        r.pop("curve", None)
    write_results(out, records, lines)
    (out / "setup.json").write_text(json.dumps({**setup, "lrs": lrs, "args": vars(args)}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
