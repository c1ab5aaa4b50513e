"""README command 1, ``python -m train.shapes``: fine-tune the bundled demo base on a concept it has never seen.

The demo base (``demo/shapes-demo.safetensors``, made once by ``python -m train.shapes base``) never saw the colour
``world.NEW_COLOUR`` nor the kind ``world.NEW_KIND`` in its training data; its frozen T5, VAE and teacher know them,
as T5-XXL knows words a DiT was never shown. This job does what a user does with released weights:

  1. load the base and score it, on held-out scenes, on the new concept and on the old ones (before);
  2. write a fine-tuning set with the world generator: records that use the concept (text-to-image, captions, VQA,
     edits, compose), mixed with ordinary records so that nothing is forgotten;
  3. fine-tune with LoRA (``--full``: every weight) through the bundled trainer and the config a user can copy,
     ``train/configs/shapes_lora.yaml``, all four losses;
  4. export the LoRA in the format the LoRA node reads and load base + LoRA through the library calls the nodes use
     (``load_model``, ``load_lora``, ``merge_lora``);
  5. score the concept and the old concepts again (after; forgetting);
  6. write a before/after contact sheet, the loss curve and ``report.md`` / ``report.json``.

Every figure is a share of held-out test records (scenes the base and the fine-tune never trained on), scored by
the fixed evaluator; the sampler settings are the ones the base chose on its validation split.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from unialign_core import load_lora, load_model, merge_lora
from unialign_core.demo import DEMO_CARD, DEMO_MODEL, DEMO_TEACHER, PACK_ROOT
from unialign_core.files import write_text_atomic

from ..config import load_config
from ..export import export_lora, export_single_file
from ..loop import run
from . import world
from .pipeline import mixed_precision
from .report import contact_sheet, loss_curve_plot
from .scorecard import SAMPLING, TARGETS, TEXT, run_scorecard

CONFIG = os.path.join(PACK_ROOT, "train", "configs", "shapes_lora.yaml")
CONCEPTS = {"colour": ("colour", world.NEW_COLOUR), "kind": ("kind", world.NEW_KIND)}
CONCEPT_TASKS = ("t2i", "caption", "vqa", "edit", "compose")
CONCEPT_SEED_OFFSET = 7000  # the fine-tuning set's random streams: other than the base's training records
MAX_FORGETTING = 0.05  # an old-concept figure may drop by at most this


def concept_targets(concept: str) -> dict:
    """The figures that show the new concept learned, with the base's own target for each."""
    t2i = "t2i_colour" if concept == "colour" else "t2i_shape"
    keys = (t2i, "caption_all", "vqa_exact", "edit_changed")
    return {k: TARGETS[k] for k in keys}


OLD_KEYS = tuple(k for k in TARGETS if k != "vae_readback")


@dataclass(frozen=True)
class Budget:
    concept_records: int  # fine-tuning records that use the concept
    ordinary_records: int  # records of the base's world, against forgetting
    steps: int
    n_before: int  # held-out records per mode for the before figures
    n_after: int  # ... for the after figures of the concept
    n_old: int  # ... for the old concepts, before and after (0: skip the forgetting check)


BUDGETS = {
    "default": Budget(concept_records=3000, ordinary_records=3000, steps=800, n_before=100, n_after=200, n_old=100),
    # the test suite's short fine-tune (tests/test_shapes_finetune.py)
    "test": Budget(concept_records=1200, ordinary_records=400, steps=150, n_before=40, n_after=40, n_old=0),
}


class MissingBase(FileNotFoundError):
    """The bundled demo base is not there."""


def demo_card(path: str = DEMO_CARD) -> dict:
    """The demo base's card (sha256, sampler settings, figures), or {} when absent."""
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def sampler_settings(card: dict) -> tuple[dict, dict]:
    """(image, text) sampler settings the base chose on its validation split, else the scorecard's defaults."""
    chosen = card.get("sampler_settings") or {}
    return chosen.get("image") or SAMPLING, chosen.get("text") or TEXT


def load_with_lora(base: str, lora: str | None, strength: float = 1.0):
    """The base model with a LoRA merged into its weights, through the library calls the nodes use."""
    model = load_model(base)
    if lora:
        merge_lora(model.transformer, load_lora(lora), strength, lora)
    return model


def training_overrides(
    out: str, base: str, teacher: str, files: list, budget: Budget, seed: int, full: bool, ablation: bool
):
    """``--set`` pairs on top of ``shapes_lora.yaml`` (what differs per run: paths, seed, budget, mode)."""
    pairs = [
        ("run_dir", os.path.join(out, "run")),
        ("seed", seed),
        ("init.path", base),
        ("data.files", files),
        ("data.cache_dir", os.path.join(out, "cache")),
        ("teacher.path", teacher if os.path.isdir(teacher) else None),
        ("train.max_steps", budget.steps),
        ("train.mixed_precision", mixed_precision()),
    ]
    if not os.path.isdir(teacher):
        pairs.append(("loss.align", 0.0))
    if full:  # every weight: a lower rate than the LoRA's
        pairs += [("train.mode", "full"), ("train.lr", 3e-4)]
    if ablation:
        pairs += [("loss.cross", 0.0), ("loss.align", 0.0), ("teacher.path", None)]
    return pairs


def _score(model, n, seed, tasks, vocab, concept, image, text, bar):
    return run_scorecard(
        model,
        n,
        seed,
        tasks=tasks,
        vocab=vocab,
        concept=concept,
        sampling=image,
        text=text,
        ceiling=False,
        progress=lambda task, i, total: (bar.set_postfix(mode=task, refresh=False), bar.update(1)),
    )


def _scores(model, budget: Budget, n_new: int, seed: int, concept, image, text, desc: str) -> dict:
    """{"new": Scorecard of the concept, "old": Scorecard of the base's world or None}."""
    bar = tqdm(total=n_new * len(CONCEPT_TASKS) + budget.n_old * len(world.TASKS), desc=desc, dynamic_ncols=True)
    new = _score(model, n_new, seed, CONCEPT_TASKS, world.FULL, concept, image, text, bar)
    old = _score(model, budget.n_old, seed, world.TASKS, world.BASE, None, image, text, bar) if budget.n_old else None
    bar.close()
    return {"new": new, "old": old}


def before_after_rows(before, after, per_task: int = 2) -> list:
    """Contact-sheet rows (task, [input, before, after], text) from two scorecards of the same records."""
    rows, used = [], {}
    for (task, b_images, b_text), (_, a_images, a_text) in zip(before.examples, after.examples):
        if used.get(task, 0) >= per_task:
            continue
        used[task] = used.get(task, 0) + 1
        if task in ("caption", "vqa"):
            rows.append((task, b_images[:1], f"before: {b_text} || after: {a_text}"))
        elif task == "t2i":
            rows.append((task, [b_images[0], a_images[0]], f"{b_text} (before | after)"))
        else:  # edit, compose, perception: input, before, after
            rows.append((task, [b_images[0], b_images[1], a_images[1]], f"{b_text} (input | before | after)"))
    return rows


def finetune_job(
    out: str,
    concept_name: str = "colour",
    seed: int = 0,
    full: bool = False,
    ablation: bool = False,
    budget_name: str = "default",
    base: str = DEMO_MODEL,
    teacher: str = DEMO_TEACHER,
) -> dict:
    """Run the six stages; returns the report dict (also ``out/report.json``)."""
    if not os.path.exists(base):
        raise MissingBase(
            f"the demo base {base} is missing: it ships with the repository (a clone without Git LFS or a "
            "partial checkout leaves it out); rebuild it with `python -m train.shapes base` (about 2 hours)"
        )
    budget, concept = BUDGETS[budget_name], CONCEPTS[concept_name]
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    image, text = sampler_settings(demo_card() if base == DEMO_MODEL else {})
    timings, started = {}, time.perf_counter()

    def timed(name, fn, *args):
        t = time.perf_counter()
        result = fn(*args)
        timings[name] = round(time.perf_counter() - t, 1)
        return result

    print(f"1/6 before: the base on held-out scenes ({concept_name} {concept[1]!r}, and the old concepts)", flush=True)
    before = timed(
        "before",
        lambda: _scores(load_with_lora(base, None), budget, budget.n_before, seed, concept, image, text, "1/6 before"),
    )

    def write_data():
        folder = os.path.join(out, "data")
        concept_file = world.make_dataset(
            folder,
            budget.concept_records,
            seed=seed + CONCEPT_SEED_OFFSET,
            tasks=CONCEPT_TASKS,
            vocab=world.FULL,
            concept=concept,
            name="concept",
        )
        ordinary = world.make_dataset(
            folder, budget.ordinary_records, seed=seed + CONCEPT_SEED_OFFSET + 1, vocab=world.BASE, name="ordinary"
        )
        return [concept_file, ordinary]

    print(
        f"2/6 data: {budget.concept_records} records with {concept[1]!r} + {budget.ordinary_records} ordinary",
        flush=True,
    )
    files = timed("data", write_data)

    kind = "full fine-tune" if full else "LoRA"
    print(f"3/6 train: {kind}, {budget.steps} steps, {CONFIG}", flush=True)
    cfg = load_config(CONFIG, training_overrides(out, base, teacher, files, budget, seed, full, ablation))
    timed("train", run, cfg, "latest" if os.path.isdir(cfg.run_dir) else None)

    print("4/6 export and load base + fine-tune as the nodes do", flush=True)
    if full:
        weights = timed(
            "export", export_single_file, cfg.run_dir, os.path.join(out, "finetuned.safetensors"), False, "bf16", True
        )
        after_model = load_with_lora(weights, None)
    else:
        weights = timed("export", export_lora, cfg.run_dir, os.path.join(out, "lora.safetensors"))
        after_model = load_with_lora(base, weights)

    print("5/6 after: the same held-out scenes, more of them for the concept", flush=True)
    after = timed("after", _scores, after_model, budget, budget.n_after, seed, concept, image, text, "5/6 after")

    print("6/6 contact sheet, loss curve and report", flush=True)
    wall = time.perf_counter() - started
    return write_report(
        out, concept_name, budget, seed, full, ablation, before, after, timings, wall, weights, cfg.run_dir
    )


def write_report(
    out, concept_name, budget, seed, full, ablation, before, after, timings, wall, weights, run_dir
) -> dict:
    targets = concept_targets(concept_name)
    new_b, new_a = before["new"], after["new"]
    old_b, old_a = before["old"], after["old"]
    forgetting = {}
    if old_b is not None:
        forgetting = {k: round(old_a.figures.get(k, 0.0) - old_b.figures.get(k, 0.0), 3) for k in OLD_KEYS}
    met = {k: new_a.figures.get(k, 0.0) >= t for k, t in targets.items()}
    met.update({f"old_{k}": d >= -MAX_FORGETTING for k, d in forgetting.items()})
    sheet = contact_sheet(before_after_rows(new_b, new_a), os.path.join(out, "before_after.png"))
    curve = loss_curve_plot(os.path.join(run_dir, "metrics.jsonl"), os.path.join(out, "loss_curve.png"))
    result = {
        "concept": concept_name,
        "value": CONCEPTS[concept_name][1],
        "mode": "full" if full else "lora",
        "ablation": ablation,
        "seed": seed,
        "budget": dataclasses.asdict(budget),
        "wall_s": round(wall, 1),
        "stage_s": timings,
        "targets": targets,
        "new_before": new_b.figures,
        "new_after": new_a.figures,
        "new_counts_before": new_b.counts,
        "new_counts_after": new_a.counts,
        "old_before": old_b.figures if old_b else None,
        "old_after": old_a.figures if old_a else None,
        "old_counts": old_a.counts if old_a else None,
        "forgetting": forgetting,
        "met": met,
        "weights": weights,
        "contact_sheet": sheet,
        "loss_curve": curve,
    }
    write_text_atomic(os.path.join(out, "report.json"), json.dumps(result, indent=1))
    lines = [
        f"# Fine-tuning the demo base on {concept_name} {CONCEPTS[concept_name][1]!r} "
        f"({result['mode']}{', without L_cross and L_align' if ablation else ''})",
        "",
        f"seed {seed}; wall {wall:.0f} s; stages (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()),
        "",
        "## The new concept (held-out test scenes that use it)",
        "",
        "| metric | before | n | after | n | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in sorted(new_a.figures):
        t = targets.get(k)
        ok = "" if t is None else ("yes" if met[k] else "**no**")
        lines.append(
            f"| {k} | {new_b.figures.get(k, 0.0):.3f} | {new_b.counts.get(k, 0)} | {new_a.figures[k]:.3f} | "
            f"{new_a.counts[k]} | {'' if t is None else f'{t:.2f}'} | {ok} |"
        )
    if old_b is not None:
        lines += [
            "",
            f"## The old concepts (forgetting: each may drop by at most {MAX_FORGETTING})",
            "",
            "| metric | before | after | change | n | met |",
            "|---|---|---|---|---|---|",
        ]
        for k in OLD_KEYS:
            if k in old_a.figures:
                ok = "yes" if met[f"old_{k}"] else "**no**"
                lines.append(
                    f"| {k} | {old_b.figures[k]:.3f} | {old_a.figures[k]:.3f} | {forgetting[k]:+.3f} | "
                    f"{old_a.counts[k]} | {ok} |"
                )
    lines += ["", "![before and after](before_after.png)", "", "![loss curve](loss_curve.png)", ""]
    write_text_atomic(os.path.join(out, "report.md"), "\n".join(lines))
    return result


def side_by_side(out: str, result: dict, ablated: dict) -> None:
    """Add the ablation (same budget, no L_cross and L_align) beside the main run to ``out/report.md``/json."""
    keys = sorted(result["new_after"])
    lines = [
        "",
        "## Ablation: the same fine-tune without L_cross and L_align (`--ablation`)",
        "",
        "| metric (new concept, after) | all four losses | without L_cross, L_align | n |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {k} | {result['new_after'][k]:.3f} | {ablated['new_after'].get(k, 0.0):.3f} | "
        f"{result['new_counts_after'][k]} |"
        for k in keys
    ]
    if result["old_after"] and ablated["old_after"]:
        lines += [
            "",
            "| metric (old concepts, after) | all four losses | without L_cross, L_align | n |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {result['old_after'][k]:.3f} | {ablated['old_after'].get(k, 0.0):.3f} | {result['old_counts'][k]} |"
            for k in OLD_KEYS
            if k in result["old_after"]
        ]
    with open(os.path.join(out, "report.md"), "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    result["ablation_new_after"], result["ablation_old_after"] = ablated["new_after"], ablated["old_after"]
    write_text_atomic(os.path.join(out, "report.json"), json.dumps(result, indent=1))
