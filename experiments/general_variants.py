"""Ablations of a trained general rule that need no meta-training of their own.

From a weights file of :class:`~learned_opt.rules.GeneralLSTMRule` with ``lr_adapt``, writes
into ``--out``:

- ``no-lr-adapt.pt``: the same weights with the per-tensor step-size adaptation switched off
  (``lr_adapt = 0``): what the adaptation adds to these weights;
- ``untrained.pt``: the same configuration at its initialization (zero read-out, base learning
  rate at ``lr``), i.e. Adam with per-tensor hypergradient step sizes and no learned correction:
  what meta-training adds.

Each file's metadata names its source file and that file's SHA-256.

    python experiments/general_variants.py --weights runs/general/adapt/weights.pt --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from learned_opt import load_rule, save_rule
from learned_opt.rules import GeneralLSTMRule, build_rule


def variants(weights: Path, out: Path) -> dict[str, Path]:
    rule, meta = load_rule(weights)
    if not isinstance(rule, GeneralLSTMRule) or rule.lr_adapt <= 0:
        raise ValueError(f"{weights}: not a general-lstm rule with lr_adapt > 0")
    source = {
        "source_weights": str(weights),
        "source_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "source_command": meta.get("command"),
    }
    out.mkdir(parents=True, exist_ok=True)
    off = build_rule(rule.kind, {**rule.config(), "lr_adapt": 0.0})
    off.load_state_dict(rule.state_dict())
    untrained = build_rule(rule.kind, rule.config())  # freshly initialized: zero read-out
    paths = {"no-lr-adapt": out / "no-lr-adapt.pt", "untrained": out / "untrained.pt"}
    save_rule(
        paths["no-lr-adapt"],
        off,
        {**source, "note": "the source weights with the step-size adaptation off (lr_adapt=0)"},
    )
    save_rule(
        paths["untrained"],
        untrained,
        {**source, "note": "the source configuration at initialization (no meta-training)"},
    )
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        paths = variants(args.weights, args.out)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    for path in paths.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
