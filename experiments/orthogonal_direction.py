"""Recipe of a default candidate: ``general-v5`` moving matrices along Muon's orthogonal direction.

    python experiments/orthogonal_direction.py                   # validate: compare the variants
    python experiments/orthogonal_direction.py --steps weights   # the chosen variant as weights
    SEALED_ARGS=--total-steps bash benchmarks/results/sealed/candidate.sh \
        experiments/orthogonal_direction.py orthogonal-direction   # its sealed test, once
    python experiments/orthogonal_direction.py --steps ship      # after its sealed test

Run it from the repository root. Why: on the validation group, tuned Muon (orthogonalized
momentum for every tensor of 2 or more dimensions, Adam for the rest) ends 1,000 steps 13% below
tuned Adam where ``general-v5`` ends 1% below it, most of all on the attention and recurrent
models, the sealed group's hardest tasks for ``general-v5``. The rule's hand-designed parts (the
per-tensor step-size adaptation, clipping, warm-up and decay) and its LSTM read-out do not depend
on the direction they scale, so the variants keep them and change only the direction of
matrix-shaped parameters (``LSTMCorrectedAdamConfig.orthogonal``; with ``orthogonal_rms`` at the
root mean square of the tensor's Adam direction instead of Muon's 0.2).

The steps:

1. ``validate``: each variant of :data:`VARIANTS` (``general-v5``'s weights and schedule, base
   settings changed) with ``benchmarks/sealed.py --group validation --total-steps`` (the five
   members of the validation group, 5 evaluation seeds each, ratios to Adam tuned on 2 other
   seeds) at 100 and 1,000 steps; the reference variant's run also tunes Muon, constant and with
   warm-up and cosine decay. Writes ``benchmarks/results/validation/orthogonal-direction/``;
   the variant with the lowest mean log geometric-mean ratio over the two horizons is chosen
   (:data:`CHOSEN`).
2. ``weights``: writes ``runs/orthogonal-direction/weights.pt``.
3. ``sealed`` (``benchmarks/results/sealed/candidate.sh``, told the horizon), once.
4. ``ship``: the weights as ``general-v6`` with their provenance and validation and sealed
   figures (against ``general-v5``'s sealed runs); ``figures.default_candidate`` records
   whether they are at most ``general-v5``'s at both horizons.
"""

from __future__ import annotations

import argparse
import math
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

#: The base settings compared, by name (``"general-v5"``: as shipped, the reference).
VARIANTS: dict[str, dict[str, Any]] = {
    "general-v5": {},
    "orthogonal": {"orthogonal": True},
    "orthogonal, Adam's RMS": {"orthogonal": True, "orthogonal_rms": True},
}
#: The variant the validation step chose.
CHOSEN = "orthogonal, Adam's RMS"
WEIGHTS, NAME = "general-v5", "general-v6"
HORIZONS = (100, 1000)
RUN = Path("runs/orthogonal-direction")
RESULTS = Path("benchmarks/results/validation/orthogonal-direction")
SEALED_NAME, REPLACED_SEALED = "orthogonal-direction", "horizon-decay"
SCRIPT = "experiments/orthogonal_direction.py"
#: The reference run's baselines beside the learned optimizer.
BASELINES = "muon,muon-cosine"


def slug(variant: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in variant.lower()).strip("-").replace("--", "-")


def variant_rule(variant: str):
    """``general-v5`` (weights, schedule) with the base settings of ``variant``."""
    import learned_opt
    from learned_opt import load_rule
    from learned_opt.rules import build_rule

    base, _ = load_rule(learned_opt.pretrained.path(WEIGHTS))
    config = base.config()
    config["base_config"] = {**config["base_config"], **VARIANTS[variant]}
    rule = build_rule(base.kind, config)
    rule.load_state_dict(base.state_dict())
    return rule


def write_weights(path: Path, variant: str = CHOSEN) -> None:
    from learned_opt import save_rule

    path.parent.mkdir(parents=True, exist_ok=True)
    source = f"the shipped {WEIGHTS!r} with the base settings {VARIANTS[variant]}"
    save_rule(path, variant_rule(variant), {"source": source, "variant": variant})


def _seconds(run: Path) -> float:
    """The seconds a ``benchmarks/sealed.py`` run took (its ``summary.jsonl``'s meta row)."""
    from learned_opt.report import read_jsonl

    (meta,) = [r for r in read_jsonl(run / "summary.jsonl") if r["kind"] == "meta"]
    return round(meta["seconds"], 1)


def _validate_command(variant: str, out: Path) -> list[str]:
    """The validation run of ``variant`` (its weights at ``RUN/<slug>.pt``)."""
    optimizers = "learned" + ("," + BASELINES if not VARIANTS[variant] else "")
    return [
        sys.executable, "benchmarks/sealed.py", "--group", "validation", "--total-steps",
        "--weights", str(RUN / f"{slug(variant)}.pt"), "--optimizers", optimizers,
        "--steps", ",".join(map(str, HORIZONS)), "--out", str(out / slug(variant)),
    ]  # fmt: skip


def _validate_one(variant: str, out: Path) -> dict[str, Any]:
    write_weights(RUN / f"{slug(variant)}.pt", variant)
    command = _validate_command(variant, out)
    log = out / f"{slug(variant)}.log"
    with log.open("w") as f:
        subprocess.run(command, check=True, stdout=f, stderr=subprocess.STDOUT)
    return {"variant": variant, "seconds": _seconds(out / slug(variant))}


def figures(out: Path) -> dict[str, dict[int, dict[str, float]]]:
    """Per variant and horizon, each optimizer's geometric mean of the final-loss ratios to
    tuned Adam over the validation group's members (from the runs' ``summary.jsonl``)."""
    from learned_opt.evaluate import geometric_mean
    from learned_opt.report import read_jsonl

    found: dict[str, dict[int, dict[str, float]]] = {}
    for variant in VARIANTS:
        rows = read_jsonl(out / slug(variant) / "summary.jsonl")
        rows = [r for r in rows if r["kind"] == "summary" and r["optimizer"] != "adam"]
        found[variant] = {
            h: {
                o: geometric_mean([r["ratio_train"] for r in rows
                                   if r["steps"] == h and r["optimizer"] == o])
                for o in sorted({r["optimizer"] for r in rows})
            }
            for h in HORIZONS
        }  # fmt: skip
    return found


def choose(found: dict[str, dict[int, dict[str, float]]]) -> str:
    """The variant with the lowest mean log ratio of the learned optimizer over the horizons."""
    return min(found, key=lambda v: sum(math.log(found[v][h]["learned"]) for h in HORIZONS))


def validate(
    out: Path, procs: int, variants: list[str] | None = None, resume: bool = False
) -> str | None:
    """Run ``variants`` (default: all; with ``resume``, those without a run in ``out``); once
    every variant has its run, write the table and records and return the chosen variant
    (else ``None``)."""
    from learned_opt.report import write_results

    out.mkdir(parents=True, exist_ok=True)
    done = {v for v in VARIANTS if (out / slug(v) / "summary.jsonl").is_file()}
    todo = [v for v in (variants or list(VARIANTS)) if not (resume and v in done)]
    with ThreadPoolExecutor(procs) as pool:
        list(pool.map(lambda v: _validate_one(v, out), todo))
    missing = [v for v in VARIANTS if not (out / slug(v) / "summary.jsonl").is_file()]
    if missing:
        print(f"# the table waits for the runs of {missing}", flush=True)
        return None
    records = [{"variant": v, "seconds": _seconds(out / slug(v))} for v in VARIANTS]
    found = figures(out)
    lines = [
        f"`{WEIGHTS}` told the horizon, its matrices' direction changed, on the validation "
        "group (5 members x 5 seeds; geometric mean of the final training loss / tuned Adam's):",
        "",
        "| variant | " + " | ".join(f"{h} steps" for h in HORIZONS) + " |",
        "| --- | " + " | ".join("---:" for _ in HORIZONS) + " |",
    ]
    for variant in VARIANTS:
        cells = " | ".join(f"{found[variant][h]['learned']:.3f}" for h in HORIZONS)
        lines.append(f"| {variant} | {cells} |")
    reference = found[next(iter(VARIANTS))]
    for baseline in BASELINES.split(","):
        cells = " | ".join(f"{reference[h][baseline]:.3f}" for h in HORIZONS)
        lines.append(f"| {baseline}, tuned (baseline) | {cells} |")
    for r in records:
        r["geometric_means"] = {str(h): found[r["variant"]][h] for h in HORIZONS}
    write_results(out, records, lines)
    return choose(found)


def ship(dest: Path, sealed: Path = Path("benchmarks/results/sealed")) -> dict[str, Any]:
    """Write the chosen variant as ``dest/general-v6.pt`` (and ``.json``) with the metadata of
    ``general-v5`` it derives from, the validation figures and the sealed figures (told the
    horizon) against ``general-v5``'s. Returns the metadata."""
    import learned_opt
    from learned_opt import load_rule
    from learned_opt.report import read_jsonl

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import candidates

    _, meta = load_rule(learned_opt.pretrained.path(WEIGHTS))
    sealed_figures = candidates.sealed_comparison(
        sealed, SEALED_NAME, WEIGHTS, HORIZONS, replaced_name=REPLACED_SEALED,
        benchmark=candidates.TOLD_HORIZON,
    )  # fmt: skip
    records = read_jsonl(RESULTS / "records.jsonl")
    by_variant = {r["variant"]: r for r in records}
    validation = {
        "command": f"python {SCRIPT} --steps validate",
        "results": str(RESULTS),
        "metric": "geometric mean over the validation group's 5 members of the final training "
        "loss / tuned Adam's (5 seeds each), the horizon told",
        "by_steps": {
            str(h): {"chosen": round(by_variant[CHOSEN]["geometric_means"][str(h)]["learned"], 4),
                     WEIGHTS: round(by_variant[WEIGHTS]["geometric_means"][str(h)]["learned"], 4)}
            for h in HORIZONS
        },
        "selection_seconds": round(sum(r["seconds"] for r in records), 1),
    }  # fmt: skip
    return candidates.write_derived(
        dest, NAME, variant_rule(CHOSEN), derived_from=WEIGHTS, base_meta=meta,
        source=f"the shipped {WEIGHTS!r} moving matrix-shaped parameters along Muon's "
        "orthogonalized direction",
        settings=VARIANTS[CHOSEN], validation=validation, recipe=f"python {SCRIPT}",
        figures=sealed_figures,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", default="validate", help="comma list of validate,weights,ship")
    # where ship writes: the package by default; tests ship into a temporary directory
    parser.add_argument("--ship-to", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS, help="the validation's folder")
    parser.add_argument("--procs", type=int, default=2, help="variants validated at once")
    parser.add_argument(
        "--variants", default=None,
        help="semicolon-separated names of VARIANTS to run (they contain commas; default: all)",
    )  # fmt: skip
    parser.add_argument("--resume", action="store_true", help="skip variants run in --out")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    variants = None if args.variants is None else args.variants.split(";")
    if unknown := sorted(set(variants or []) - set(VARIANTS)):
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    steps = args.steps.split(",")
    if unknown := sorted(set(steps) - {"validate", "weights", "ship"}):
        parser.error(f"unknown steps {unknown}; choose from validate, weights, ship")
    if args.dry_run:
        for step in steps:
            if step == "validate":
                for variant in variants or VARIANTS:
                    print(f"# {variant}: its weights -> {RUN / (slug(variant) + '.pt')}")
                    print(shlex.join(_validate_command(variant, args.out)))
            elif step == "weights":
                print(f"# weights: {CHOSEN!r} -> {RUN / 'weights.pt'}")
            elif step == "ship":
                print(f"# ship {RUN / 'weights.pt'} as {NAME!r}")
        return 0
    if "validate" in steps:
        chosen = validate(args.out, args.procs, variants, args.resume)
        if chosen is not None and chosen != CHOSEN:
            print(f"# the validation now chooses {chosen!r}, not CHOSEN {CHOSEN!r}", flush=True)
    if "weights" in steps:
        print(f"# weights: {RUN / 'weights.pt'}", flush=True)
        write_weights(RUN / "weights.pt")
    if "ship" in steps:
        import learned_opt

        dest = args.ship_to or Path(learned_opt.pretrained.__file__).parent
        print(f"# ship as {NAME!r} into {dest}", flush=True)
        ship(dest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
