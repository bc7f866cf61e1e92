"""The exploration harness behind the stabilized step-size adaptation (README, issue 4).

:class:`AdaptiveAdam` is a plain ``torch.optim`` optimizer: Adam whose per-tensor step size
follows the multiplicative hypergradient rule, with every variant tried in session 9 as an
option. With ``warmup``, ``shrink``/``margin`` and ``clip`` it computes what
:class:`~learned_opt.rules.GeneralLSTMRule` computes at a zero read-out (same seeds, equal up to
float rounding; ``tests/test_general_rule.py`` checks the rule against its own reference), so
variants can be screened without touching the library. Two commands:

    # ratio to Adam (at the benchmark's tuned learning rates) on the OOD tasks, same seeds
    python experiments/adapt_variants.py ood --steps 100 --seeds 20 warmup=5,shrink=3,clip=2
    # final losses per seed on one task (how often a variant fails)
    python experiments/adapt_variants.py seeds --task digits-gru-32 --steps 1000 --seeds 8 \
        --adam-lr 0.01 warmup=5,shrink=3,clip=2 warmup=5,clip=2

A variant is ``key=value`` pairs of :class:`AdaptiveAdam`'s options (``base`` for none).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.ood import _EVAL_STREAM, OOD_TASKS  # noqa: E402
from learned_opt.evaluate import run_optimizer, task_seed  # noqa: E402

#: Tuned Adam learning rates of the committed OOD benchmark runs (tables in benchmarks/results/).
ADAM_LR = {
    100: dict(zip(OOD_TASKS, (0.01, 0.03, 0.03, 1.0, 0.03))),
    1000: dict(zip(OOD_TASKS, (0.003, 0.01, 0.01, 1.0, 0.03))),
}


class AdaptiveAdam(torch.optim.Optimizer):
    """Adam with a per-tensor log step size ``s += kappa_t * c``, ``c = cos(-g_t, d_{t-1})``.

    Options (defaults: the plain rule of ``lr_adapt``): ``warmup``/``tau``: ``kappa_t = kappa (1
    + warmup e^{-t/tau})``; ``shrink``/``margin``: ``c`` below ``-margin`` counts ``shrink``
    times; ``clip``: gradient norm clipped at ``sqrt(clip)`` x its running RMS; ``trust``: step
    RMS at most ``trust`` x the tensor's RMS; ``ams``: AMSGrad's running max of ``v``;
    ``window``/``window_rate``: also the cosine of the gradients summed over windows of that many
    steps with the previous window's steps; ``surprise``: ``s`` drops by ``log(ratio) / 2`` when
    the gradient's squared norm exceeds ``surprise`` x its running mean (after step
    ``surprise_after``); ``slowdown``/``slowdown_rate``: positive ``c`` counts ``slowdown_rate``
    times once the gradient norm (running RMS, beta 0.9) is below ``1/slowdown`` of its peak.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 0.01, kappa: float = 0.1,
                 bound: float = math.log(1000.0), warmup: float = 0.0, tau: float = 20.0,
                 shrink: float = 1.0, margin: float = 0.2, clip: float = 0.0, trust: float = 0.0,
                 ams: bool = False, window: int = 0, window_rate: float = 0.0,
                 surprise: float = 0.0, surprise_after: int = 1, slowdown: float = 0.0,
                 slowdown_rate: float = 0.3,
                 betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        super().__init__(params, dict(lr=lr, kappa=kappa, bound=bound, warmup=warmup, tau=tau,
                                      shrink=shrink, margin=margin, clip=clip, trust=trust,
                                      ams=ams, window=window, window_rate=window_rate,
                                      surprise=surprise,
                                      surprise_after=surprise_after, slowdown=slowdown,
                                      slowdown_rate=slowdown_rate, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # noqa: C901 (one branch per option)
        for o in self.param_groups:
            b1, b2 = o["betas"]
            bound = o["bound"]
            for p in o["params"]:
                if p.grad is None:
                    continue
                g, st = p.grad, self.state[p]
                if not st:
                    st.update(t=0, s=0.0, m=torch.zeros_like(p), v=torch.zeros_like(p),
                              prev=torch.zeros_like(p))
                st["t"] += 1
                t = st["t"]
                if t > 1 and (o["clip"] or o["surprise"]):
                    ref = float(st["v"].sum()) / (1 - b2 ** (t - 1))
                    n2 = float(g.pow(2).sum())
                    if o["surprise"] and t > o["surprise_after"] and n2 > o["surprise"] * ref > 0:
                        st["s"] = max(st["s"] - 0.5 * math.log(n2 / (o["surprise"] * ref)), -bound)
                    if o["clip"] and n2 > o["clip"] * ref > 0:
                        g = g * math.sqrt(o["clip"] * ref / n2)
                st["m"].lerp_(g, 1 - b1)
                st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                v_hat = st["v"] / (1 - b2**t)
                if o["ams"]:
                    st["vmax"] = torch.maximum(st["vmax"], v_hat) if "vmax" in st else v_hat
                    v_hat = st["vmax"]
                d = -(st["m"] / (1 - b1**t)) / (v_hat.sqrt() + o["eps"])
                norm = float(g.norm() * st["prev"].norm())
                c = float(-(g * st["prev"]).sum()) / norm if norm > 0 else 0.0
                if c < -o["margin"]:
                    c = -o["margin"] + o["shrink"] * (c + o["margin"])
                if o["slowdown"]:
                    st["fast"] = 0.9 * st.get("fast", 0.0) + 0.1 * float(g.pow(2).sum())
                    norm = math.sqrt(st["fast"] / (1 - 0.9**t))
                    st["peak"] = max(st.get("peak", 0.0), norm)
                    if c > 0 and norm * o["slowdown"] < st["peak"]:
                        c *= o["slowdown_rate"]
                rate = o["kappa"] * (1 + o["warmup"] * math.exp(-t / o["tau"]))
                st["s"] = min(max(st["s"] + rate * c, -bound), bound)
                st["prev"] = d
                if o["window"]:
                    for key in ("G", "U", "P"):
                        st.setdefault(key, torch.zeros_like(p))
                    st["G"].add_(g)
                    st["U"].add_(d)
                    if t % o["window"] == 0:
                        norm = float(st["G"].norm() * st["P"].norm())
                        cw = float(-(st["G"] * st["P"]).sum()) / norm if norm > 0 else 0.0
                        st["s"] = min(max(st["s"] + o["window_rate"] * cw, -bound), bound)
                        st["P"], st["U"] = st["U"], st["P"].zero_()
                        st["G"].zero_()
                if o["trust"]:
                    rms_d = float(d.pow(2).mean().sqrt()) * o["lr"]
                    cap = o["trust"] * max(float(p.pow(2).mean().sqrt()), 1e-3)
                    if rms_d > 0 and rms_d * math.exp(st["s"]) > cap:
                        st["s"] = math.log(cap / rms_d)
                p.add_(d, alpha=o["lr"] * math.exp(st["s"]))


def parse_variant(text: str) -> dict[str, Any]:
    """``"warmup=5,clip=2,ams=true"`` -> options (``"base"``: none)."""
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        if item == "base":
            continue
        key, _, value = item.partition("=")
        low = value.lower()
        out[key] = low == "true" if low in ("true", "false") else (
            int(value) if key in ("window", "surprise_after") else float(value))
    return out


def final_losses(task: str, steps: int, seeds: list[int], factory: Any) -> list[float]:
    family = OOD_TASKS[task]("test")
    return [run_optimizer(family, s, factory, 1.0, steps).final_train_loss for s in seeds]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["ood", "seeds"])
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--stream", type=int, default=_EVAL_STREAM,
                        help="seed stream (default: the benchmark's evaluation seeds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", default="digits-gru-32", help="for 'seeds'")
    parser.add_argument("--adam-lr", type=float, help="for 'seeds' (default: the tuned one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [task_seed(args.seed, args.stream, k) for k in range(args.seeds)]
    tasks = list(OOD_TASKS) if args.command == "ood" else [args.task]
    adam: dict[str, list[float]] = {}
    for task in tasks:
        lr = args.adam_lr if args.adam_lr and args.command == "seeds" else (
            ADAM_LR.get(args.steps, ADAM_LR[100])[task])
        adam[task] = final_losses(task, args.steps, seeds,
                                  lambda p, _, lr=lr: torch.optim.Adam(p, lr=lr))
        if args.command == "seeds":
            print(f"adam (lr {lr:g}): " + " ".join(f"{x:.2g}" for x in adam[task]))
    for text in args.variants:
        options = parse_variant(text)
        ratios = []
        for task in tasks:
            mine = final_losses(task, args.steps, seeds,
                                lambda p, _, o=options: AdaptiveAdam(p, **o))
            ratios.append(sum(mine) / sum(adam[task]))
            if args.command == "seeds":
                print(f"{text}: " + " ".join(f"{x:.2g}" for x in mine)
                      + f" | mean ratio {ratios[-1]:.3g}", flush=True)
        if args.command == "ood":
            finite = all(0 < r < math.inf for r in ratios)
            gm = math.exp(sum(map(math.log, ratios)) / len(ratios)) if finite else math.inf
            print(f"{text} @ {args.steps}: " + " ".join(f"{r:.3f}" for r in ratios)
                  + f" | worst {max(ratios):.3f} geometric mean {gm:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
