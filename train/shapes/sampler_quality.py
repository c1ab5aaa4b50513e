"""Caption and VQA quality of each understanding sampler setting on a trained shapes model (held-out scenes).

    nice -n 15 python -m train.shapes.sampler_quality runs/shapes/shapes.safetensors --n 200

For every setting (``ddpm_cache``, the exact confidence sampler, and the confidence sampler with the image-stream
cache refreshed every N steps and/or threshold commits) it captions and questions the same ``n`` held-out records
of ``scorecard.records`` and scores them with ``evaluate``'s scorers: caption all-right, caption parse rate and VQA
exact, plus seconds and denoiser passes per text. "Equal quality" (issue 14) is no figure lower than
``ddpm_cache``'s by more than 0.02; the table marks each setting. Text length and steps are the scorecard's.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from unialign_core import answer, caption, load_model
from unialign_core.files import write_text_atomic
from unialign_core.text_sampler import TextDenoiser

from . import evaluate as ev
from .scorecard import TEXT, _tensor, records
from .world import Scene

# (name, sampler, refresh, threshold)
SETTINGS = [
    ("ddpm_cache", "ddpm_cache", 1, None),
    ("confidence", "confidence", 1, None),
    ("confidence r4", "confidence", 4, None),
    ("confidence r8", "confidence", 8, None),
    ("confidence t0.9", "confidence", 1, 0.9),
    ("confidence r4 t0.9", "confidence", 4, 0.9),
    ("confidence r8 t0.9", "confidence", 8, 0.9),
    ("confidence r8 t0.7", "confidence", 8, 0.7),
    ("confidence r16 t0.9", "confidence", 16, 0.9),  # one full pass: the cache is never refreshed at 16 steps
]
TOLERANCE = 0.02
METRICS = ("caption_all", "caption_parses", "vqa_exact")


def _batches(items, size):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def score_setting(model, sampler, refresh, threshold, n=200, seed=0, batch=16, length=None, steps=None) -> dict:
    """Figures of one setting on ``n`` caption and ``n`` VQA held-out records (batched, rows leave when done)."""
    text = dict(TEXT, sampler=sampler, refresh=refresh, threshold=threshold)
    text["answer_tokens"] = length or text["answer_tokens"]
    text["steps"] = steps or text["steps"]
    if sampler == "ddpm_cache":
        text.pop("refresh"), text.pop("threshold")
    figures, seconds, passes = {}, {}, {}
    for task in ("caption", "vqa"):
        recs = records(task, n, seed)
        scores = []
        start, calls = time.perf_counter(), TextDenoiser.total_calls
        for b, chunk in enumerate(_batches(recs, batch)):
            if task == "caption":
                images = torch.cat([_tensor(sources[0]) for _, sources, _ in chunk])
                for (rec, _, _), out in zip(chunk, caption(model, images, seed=seed + b, resolution=None, **text)):
                    scene = Scene.from_dict(rec["meta"]["scene"])
                    scores.append(dict(ev.score_caption(out, scene), parses=ev.parse_caption(out) is not None))
            else:  # each record has its own question: one call per record
                for rec, sources, _ in chunk:
                    out = answer(model, _tensor(sources[0]), rec["prompt"], seed=seed, resolution=None, **text)[0]
                    scores.append({"exact": ev.score_vqa(out, rec["caption"])})
        seconds[task] = (time.perf_counter() - start) / n
        passes[task] = (TextDenoiser.total_calls - calls) / (n if task == "vqa" else -(-n // batch))
        if task == "caption":
            figures["caption_all"] = sum(s["all"] for s in scores) / n
            figures["caption_parses"] = sum(s["parses"] for s in scores) / n
        else:
            figures["vqa_exact"] = sum(s["exact"] for s in scores) / n
    return {"figures": figures, "s_per_caption": seconds["caption"], "s_per_answer": seconds["vqa"],
            "passes_per_caption_batch": passes["caption"], "passes_per_answer": passes["vqa"]}  # fmt: skip


def compare(model, settings=SETTINGS, **kwargs) -> list:
    """Score every setting; each row gets ``equal_quality`` against the first (``ddpm_cache``) row."""
    rows = []
    for name, sampler, refresh, threshold in settings:
        row = dict(name=name, **score_setting(model, sampler, refresh, threshold, **kwargs))
        base = rows[0]["figures"] if rows else row["figures"]
        row["equal_quality"] = all(row["figures"][m] >= base[m] - TOLERANCE for m in METRICS)
        row["speed_vs_first"] = (rows[0]["s_per_caption"] / row["s_per_caption"]) if rows else 1.0
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows) -> str:
    lines = ["| setting | caption all-right | caption parses | VQA exact | s / caption | s / answer | "
             "passes / answer | equal quality |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        f = r["figures"]
        lines.append(f"| {r['name']} | {f['caption_all']:.3f} | {f['caption_parses']:.3f} | {f['vqa_exact']:.3f} | "
                     f"{r['s_per_caption']:.3f} | {r['s_per_answer']:.3f} | {r['passes_per_answer']:.1f} | "
                     f"{'yes' if r['equal_quality'] else 'no'} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a shapes model file (runs/shapes/shapes.safetensors) or any load_model path")
    parser.add_argument("--n", type=int, default=200, help="held-out records per mode (the issue asks >= 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16, help="images per caption call")
    parser.add_argument("--length", type=int, default=None, help=f"text tokens (default {TEXT['answer_tokens']})")
    parser.add_argument("--steps", type=int, default=None, help=f"steps (default {TEXT['steps']})")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    rows = compare(model, n=args.n, seed=args.seed, batch=args.batch, length=args.length, steps=args.steps)
    if args.json:
        write_text_atomic(args.json, json.dumps(rows, indent=2))
    print(markdown(rows))


if __name__ == "__main__":
    main()
