"""python -m train.shapes [--quick] [--out runs/shapes] [--seed 0] [--ablation]

The embedded default: generate the shapes world, train its VAE, tokenizer, T5 and CLIP teacher, train a small
UniAlignment with the bundled trainer, export it, run every mode on held-out scenes and write a report.
"""

import argparse
import logging
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.shapes", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="the short CI variant (about 3 minutes, looser checks)")
    parser.add_argument("--out", default=None, help="output folder (default runs/shapes, or runs/shapes-quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="also train a second model on the same budget without L_cross and L_align and put both "
        "side by side in the report (doubles the training and evaluation time)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("PIL", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from .pipeline import main_job

    profile = "quick" if args.quick else "full"
    out = args.out or ("runs/shapes-quick" if args.quick else "runs/shapes")
    result = main_job(out, profile, args.seed, args.ablation)
    print(f"report: {out}/report.md  contact sheet: {result['contact_sheet']}  wall {result['wall_s']} s")
    for key, value in result["figures"].items():
        print(f"  {key:28s} {value:.3f}")
    if result["below_quick_floors"]:
        print(f"below the floors a working model clears: {result['below_quick_floors']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
