"""python -m train.shapes [--concept colour|kind] [--full] [--ablation] [--seed 0] [--out DIR]
python -m train.shapes base [--out runs/shapes-base] [--resume]
python -m train.shapes scratch [--quick] [--ablation] [--seed 0] [--out DIR]

The shapes world, the embedded default. With no profile (README command 1): fine-tune the bundled demo base on a
concept it has never seen (the colour cyan, or with --concept kind the ring), with LoRA or (--full) every weight,
and report every mode before and after. `base`: train the demo base from scratch with the bundled trainer (about
two hours on 2 CPU cores; killed, it continues with --resume). `scratch`: the 15-minute from-scratch job.
"""

import argparse
import logging
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.shapes",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=__doc__.split("\n\n")[0],
    )
    parser.add_argument("profile", nargs="?", default=None, choices=("base", "scratch"), help=argparse.SUPPRESS)
    parser.add_argument("--concept", choices=("colour", "kind"), default="colour", help="what to fine-tune on")
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--quick", action="store_true", help="scratch: the short variant (about 3 minutes)")
    parser.add_argument("--out", default=None, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="base: continue the run in --out where it stopped")
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="also run the same budget without L_cross and L_align and put both side by side",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("PIL", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.profile is None and not args.quick:
        return finetune(args)
    from .pipeline import main_job  # lazy, as below: the training stack loads only for the job that runs

    profile = "quick" if args.quick else ("full" if args.profile == "scratch" else "base")
    out = args.out or {"quick": "runs/shapes-quick", "full": "runs/shapes", "base": "runs/shapes-base"}[profile]
    result = main_job(out, profile, args.seed, args.ablation, resume=args.resume or profile != "base")
    print(f"report: {out}/report.md  contact sheet: {result['contact_sheet']}  wall {result['wall_s']} s")
    for key, value in result["figures"].items():
        print(f"  {key:28s} {value:.3f}")
    if result["below_quick_floors"]:
        print(f"below the floors a working model clears: {result['below_quick_floors']}", file=sys.stderr)
        return 1
    return 0


def finetune(args) -> int:
    from .finetune import MissingBase, finetune_job, side_by_side

    out = args.out or f"runs/shapes-finetune-{args.concept}{'-full' if args.full else ''}-s{args.seed}"
    try:
        result = finetune_job(out, args.concept, args.seed, args.full)
        if args.ablation:
            ablated = finetune_job(f"{out}/ablation", args.concept, args.seed, args.full, ablation=True)
            side_by_side(out, result, ablated)
    except MissingBase as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {out}/report.md  before/after: {result['contact_sheet']}  wall {result['wall_s']} s")
    for key, value in result["new_after"].items():
        print(f"  {key:28s} {result['new_before'].get(key, 0.0):.3f} -> {value:.3f}")
    missed = [k for k, ok in result["met"].items() if not ok]
    if missed:
        print(f"targets missed: {missed}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
