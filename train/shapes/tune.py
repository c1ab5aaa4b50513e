"""``python -m train.shapes.tune MODEL``: choose the shapes model's sampler settings on the validation split.

The report scores the test split; sampler settings (image steps and guidance, text steps) are chosen here, on
validation scenes that neither training nor the report uses (``world.scene_split`` == "val", own random
streams). The chosen values are then fixed in ``scorecard.SAMPLING`` / ``scorecard.TEXT`` by hand, and the
report names this split as their source. Prints one line per setting and writes ``--json``.
"""
from __future__ import annotations

import argparse
import json
import sys

IMAGE_GRID = [dict(steps=20, guidance=g) for g in (1.5, 3.0, 5.0)] + [dict(steps=10, guidance=3.0)]
TEXT_GRID = [dict(length=24, steps=s, sampler="confidence") for s in (8, 16)]
IMAGE_KEYS = ("t2i_colour", "t2i_shape", "t2i_position", "edit_changed", "edit_kept", "perception_edge_f1",
              "compose_colour", "compose_position")
TEXT_KEYS = ("caption_all", "vqa_exact")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.shapes.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="an exported shapes model (runs/shapes/shapes.safetensors)")
    parser.add_argument("--n", type=int, default=100, help="validation records per mode and setting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    from unialign_core import load_model

    from .scorecard import SAMPLING, TEXT, run_scorecard

    model = load_model(args.model)
    rows = []
    for sampling in IMAGE_GRID:
        card = run_scorecard(model, args.n, args.seed, split="val", tasks=("t2i", "edit", "perception", "compose"),
                             sampling=sampling, text=TEXT, ceiling=False)
        figures = {k: round(card.figures.get(k, 0.0), 3) for k in IMAGE_KEYS}
        rows.append({"image": sampling, "figures": figures, "mean": round(sum(figures.values()) / len(figures), 4)})
        print(json.dumps(rows[-1]), flush=True)
    for text in TEXT_GRID:
        card = run_scorecard(model, args.n, args.seed, split="val", tasks=("caption", "vqa"), sampling=SAMPLING,
                             text=text, ceiling=False)
        figures = {k: round(card.figures.get(k, 0.0), 3) for k in TEXT_KEYS}
        rows.append({"text": text, "figures": figures, "mean": round(sum(figures.values()) / len(figures), 4)})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"split": "val", "n": args.n, "seed": args.seed, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
