"""Sampler settings of the shapes model, chosen on the validation split (stage 7a of ``python -m train.shapes``).

The report scores the test split; the settings it uses (image guidance, text steps) are chosen here, per run,
on validation scenes that neither training nor the report uses (``world.scene_split`` == "val", own random
streams), by the mean of the image-mode figures and of the text-mode figures. ``python -m train.shapes.tune
MODEL`` prints the whole grid.
"""

from __future__ import annotations

import argparse
import json
import sys

from unialign_core import load_model

from .scorecard import SAMPLING, TEXT, run_scorecard
from .world import FULL

IMAGE_GRID = [dict(steps=20, guidance=g) for g in (2.0, 3.0, 5.0)]
TEXT_GRID = [dict(answer_tokens=24, steps=s, sampler="confidence") for s in (12, 24)]
IMAGE_KEYS = (
    "t2i_colour",
    "t2i_shape",
    "t2i_position",
    "edit_changed",
    "edit_kept",
    "perception_edge_f1",
    "compose_colour",
    "compose_position",
)
TEXT_KEYS = ("caption_all", "vqa_exact")


def choose(model, n: int = 50, seed: int = 0, progress=None, vocab=None) -> dict:
    """{"image": best image settings, "text": best text settings, "rows": every setting's validation figures}."""
    rows, best = [], {}
    for kind, grid, tasks, keys in (
        ("image", IMAGE_GRID, ("t2i", "edit", "perception", "compose"), IMAGE_KEYS),
        ("text", TEXT_GRID, ("caption", "vqa"), TEXT_KEYS),
    ):
        for setting in grid:
            card = run_scorecard(
                model,
                n,
                seed,
                split="val",
                tasks=tasks,
                ceiling=False,
                examples=0,
                sampling=setting if kind == "image" else SAMPLING,
                text=setting if kind == "text" else TEXT,
                vocab=vocab or FULL,
            )
            figures = {k: round(card.figures.get(k, 0.0), 3) for k in keys}
            row = {kind: setting, "figures": figures, "mean": round(sum(figures.values()) / len(figures), 4)}
            rows.append(row)
            if kind not in best or row["mean"] > best[kind]["mean"]:
                best[kind] = row
            if progress is not None:
                progress(row)
    return {"split": "val", "n": n, "image": best["image"]["image"], "text": best["text"]["text"], "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.shapes.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="an exported shapes model (runs/shapes/shapes.safetensors)")
    parser.add_argument("--n", type=int, default=50, help="validation records per mode and setting")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = choose(load_model(args.model), args.n, args.seed, progress=lambda row: print(json.dumps(row)))
    print(json.dumps({"chosen": {"image": result["image"], "text": result["text"]}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
