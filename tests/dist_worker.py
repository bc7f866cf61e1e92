"""Run under torchrun by tests/test_distributed.py: meta-train, then save this rank's weights."""

from __future__ import annotations

import json
import sys
import weakref
from pathlib import Path

import torch

from learned_opt import distributed
from learned_opt.outer import MetaTrainConfig, MetaTrainer

#: The meta-training of the worker (tests/test_distributed.py runs the same in one process).
CONFIG = dict(
    family="quadratic",
    horizon=20,
    min_horizon=5,  # tasks of different lengths: ranks with different window counts
    truncation=5,
    meta_batch=4,
    iterations=3,
    eval_every=0,
    meta_lr=3e-3,
    clip_grad=0.0,  # unclipped, so that a wrong weighting of the ranks shows
    seed=5,
)

if __name__ == "__main__":
    out = Path(sys.argv[1])
    assert distributed.init_from_env(timeout_s=60)
    group, rank = weakref.ref(torch.distributed.group.WORLD), distributed.rank()
    cfg = MetaTrainConfig(**CONFIG)
    if len(sys.argv) > 2 and sys.argv[2] == "resume-split":  # each rank its own --ckpt-dir
        trainer = MetaTrainer(cfg, ckpt_dir=out / f"ckpt{rank}")
        resumed = trainer.resume()
        weights = [p.detach().clone() for p in trainer.learner.parameters()]
        torch.save({"resumed": resumed, "iteration": trainer.iteration, "weights": weights},
                   out / f"rank{rank}_resume.pt")  # fmt: skip
        distributed.shutdown()
        sys.exit(0)
    if len(sys.argv) > 2 and sys.argv[2] == "disagree":  # rank 1 given another meta_lr
        cfg = MetaTrainConfig(**{**CONFIG, "meta_lr": CONFIG["meta_lr"] * (1 + rank)})
        try:
            MetaTrainer(cfg).train()
        except ValueError as exc:
            (out / f"rank{rank}_refused.txt").write_text(str(exc))
        distributed.shutdown()
        sys.exit(0)
    trainer = MetaTrainer(cfg)
    own, logged = [], []  # each iteration's statistics: this rank's tasks; as logged
    unroll_own_tasks = trainer.train_iteration

    def spy() -> dict:
        stats = unroll_own_tasks()
        own.append(dict(stats))
        return stats

    trainer.train_iteration = spy

    def maybe_die(tr: MetaTrainer, stats: dict) -> None:
        logged.append(dict(stats))
        if len(sys.argv) > 2 and sys.argv[2] == "die" and distributed.rank() == 1:
            import os

            os._exit(3)  # a crashed rank: no clean shutdown, no more collectives

    trainer.train(on_iteration=maybe_die)
    (out / f"rank{rank}_stats.json").write_text(json.dumps({"own": own, "logged": logged}))
    weights = [p.detach().clone() for p in trainer.learner.parameters()]
    torch.save(weights, out / f"rank{distributed.rank()}.pt")
    distributed.shutdown()
    # Nothing may keep the group alive past shutdown: one destroyed at interpreter exit can abort
    # the process (see distributed.init_from_env).
    (out / f"rank{rank}_group_freed.txt").write_text(str(group() is None))
