"""The contact sheet and the report of ``python -m train.shapes`` (stage 8)."""

from __future__ import annotations

import dataclasses
import json
import os
import platform

import torch
from PIL import Image, ImageDraw

from unialign_core.files import write_text_atomic

from .scorecard import QUICK_FLOORS, TARGETS

CELL = 96  # pixels per image in the contact sheet (32 px images scaled x3, nearest)
TEXT_WIDTH = 420


def contact_sheet(examples, path: str) -> str:
    """One row per example: its images (sources, output, truth) and its text."""
    rows = len(examples)
    sheet = Image.new("RGB", (3 * (CELL + 4) + TEXT_WIDTH, rows * (CELL + 4) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (task, images, text) in enumerate(examples):
        y = 4 + r * (CELL + 4)
        for c, img in enumerate(images[:3]):
            sheet.paste(img.convert("RGB").resize((CELL, CELL), Image.NEAREST), (4 + c * (CELL + 4), y))
        x = 4 + 3 * (CELL + 4)
        draw.text((x, y + 4), task, fill=(0, 0, 160))
        words, line, lines = text.split(), "", []
        for word in words:  # wrap at ~64 characters
            if len(line) + len(word) > 64:
                lines.append(line)
                line = ""
            line = f"{line} {word}".strip()
        lines.append(line)
        for k, part in enumerate(lines[:5]):
            draw.text((x, y + 20 + 14 * k), part, fill=(0, 0, 0))
    sheet.save(path)
    return path


def _row(name, value, target, other=None, count=None):
    ok = "" if target is None else ("yes" if value >= target else "**no**")
    cells = [name, f"{value:.3f}", "" if count is None else str(count), "" if target is None else f"{target:.2f}", ok]
    if other is not None:
        cells.append("" if name not in other else f"{other[name]:.3f}")
    return "| " + " | ".join(cells) + " |"


def _diagnosis_lines(d: dict) -> list:
    """The report's "why" section from ``diagnose.diagnose``'s numbers (validation split)."""
    if not d:
        return []
    sig = "/".join(str(s) for s in d["sigmas"])
    t2i, edit, cap = d["t2i_text_use"], d["edit_source_use"], d["caption_teacher_forced"]

    def errs(rows):
        return "; ".join(f"{k} {'/'.join(f'{v:.3f}' for v in vals)}" for k, vals in rows.items())

    return [
        f"## Why (diagnosis on the validation split, {d['n']} records each: `python -m train.shapes.diagnose MODEL`)",
        "",
        f"- **Text-to-image reads the prompt only at high noise.** x0 error at sigma {sig}: {errs(t2i)}. A prompt "
        "fixes the whole scene, so a model that reads it fully would reach a small error at sigma 1; the gap "
        "between the true and the empty prompt is what it has learned from the text so far.",
        f"- **Edits use the source weakly.** x0 error at sigma {sig}: {errs(edit)}; copying the source alone "
        f"gives {d['edit_copy_source_mse']:.3f}. With the empty instruction the output reads back as the source "
        f"scene {d['edit_identity_kept']:.2f} of the time. Source and target tokens share their positions and "
        "their timestep embedding (the published design), so copying must be learned from content alone.",
        f"- **Captions:** token accuracy in one pass {cap['all masked']:.3f} with every token masked and "
        f"{cap['half masked']:.3f} with half masked, against {cap['sampled all right']:.3f} sampled captions all "
        "right.",
        "",
    ]


def write(
    out: str,
    profile_name: str,
    profile,
    seed: int,
    card,
    ablation_card,
    timings: dict,
    wall: float,
    model_file: str,
    diagnosis: dict | None = None,
) -> dict:
    sheet = contact_sheet(card.examples, os.path.join(out, "contact_sheet.png"))
    failures = [k for k, floor in QUICK_FLOORS.items() if card.figures.get(k, 0.0) < floor]
    result = {
        "profile": profile_name,
        "settings": dataclasses.asdict(profile),
        "seed": seed,
        "wall_s": round(wall, 1),
        "stage_s": timings,
        "figures": card.figures,
        "counts": card.counts,
        "targets": TARGETS,
        "quick_floors": QUICK_FLOORS,
        "below_quick_floors": failures,
        "ablation_figures": ablation_card.figures if ablation_card else None,
        "model": model_file,
        "contact_sheet": sheet,
        "diagnosis": diagnosis,
        "sampler_settings": card.settings,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
    }
    write_text_atomic(os.path.join(out, "report.json"), json.dumps(result, indent=1))
    other = ablation_card.figures if ablation_card else None
    head = "| metric | value | n | target | met |" + (" without L_cross, L_align |" if other else "")
    rule = "|---|---|---|---|---|" + ("---|" if other else "")
    lines = [
        f"# Shapes world report ({profile_name})",
        "",
        f"seed {seed}; wall time {wall:.0f} s; {result['machine']}",
        "",
        f"Test split (held-out scenes): {profile.eval_per_task} records per mode (n: records behind each figure). "
        f"Model: `{model_file}`. Sampler settings (image {card.settings.get('image')}, text "
        f"{card.settings.get('text')}) were chosen by this run on the validation split "
        f"({card.settings.get('n')} records per mode and setting, `train/shapes/tune.py`), never on these "
        "records.",
        "",
        head,
        rule,
    ]
    lines += [_row(k, card.figures.get(k, 0.0), TARGETS[k], other, card.counts.get(k)) for k in TARGETS]
    lines += [_row(k, v, None, other, card.counts.get(k)) for k, v in sorted(card.figures.items()) if k not in TARGETS]
    lines += [""] + _diagnosis_lines(diagnosis)
    lines += [
        "",
        "Stage wall times (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()),
        "",
        "![contact sheet](contact_sheet.png)",
        "",
    ]
    write_text_atomic(os.path.join(out, "report.md"), "\n".join(lines))
    return result


def loss_curve_plot(metrics_jsonl: str, path: str, width: int = 640, height: int = 320, smooth: int = 25) -> str:
    """A plot of each loss term of a run's ``metrics.jsonl`` against the step (moving mean over ``smooth`` steps),
    each term scaled to its own first value so that all fit one axis."""
    rows = []
    if os.path.isfile(metrics_jsonl):
        with open(metrics_jsonl, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    terms = [t for t in ("image", "text", "cross", "align") if any(r.get(t) is not None for r in rows)]
    colours = {"image": (200, 30, 30), "text": (30, 90, 220), "cross": (30, 150, 40), "align": (180, 120, 0)}
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = 50, 20, width - 110, height - 30
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    steps = [r["step"] for r in rows]
    for n, term in enumerate(terms):
        values = [r.get(term) for r in rows]
        points, window = [], []
        for step, v in zip(steps, values):
            if v is None:
                continue
            window = (window + [v])[-smooth:]
            points.append((step, sum(window) / len(window)))
        if len(points) < 2:
            continue
        first = max(abs(points[0][1]), 1e-8)
        scaled = [(s, v / first) for s, v in points]
        top_value = max(1.0, max(v for _, v in scaled))
        xy = [
            (
                left + (right - left) * (s - steps[0]) / max(steps[-1] - steps[0], 1),
                bottom - (bottom - top) * v / top_value,
            )
            for s, v in scaled
        ]
        draw.line(xy, fill=colours[term], width=2)
        draw.text((right + 8, top + 16 * n), f"{term} {points[0][1]:.3g} -> {points[-1][1]:.3g}", fill=colours[term])
    draw.text((left, bottom + 8), f"step {steps[0] if steps else 0} .. {steps[-1] if steps else 0}", fill=(0, 0, 0))
    draw.text((left, 4), "loss terms, each relative to its first value (moving mean)", fill=(0, 0, 0))
    img.save(path)
    return path
