"""Measurements that say *why* a shapes model scores what it scores (part of the report; validation split only).

``diagnose(model)`` returns plain numbers, and ``python -m train.shapes.diagnose MODEL`` prints them:

- ``t2i_text_use``: the flow objective's x0 error on text-to-image records at several noise levels with the true
  prompt, another record's prompt and the empty prompt. A caption fixes the whole image, so a model that reads
  the prompt has a far lower error with the true one at sigma = 1; equal errors mean the prompt is ignored.
- ``edit_source_use``: the same for edit records with the true source, another record's source and no source,
  beside the error of simply copying the source. Equal errors mean the source tokens are ignored.
- ``edit_identity_kept``: with the empty instruction, how often the output reads back as the source scene.
- ``caption_teacher_forced``: token accuracy of the caption in one pass with every token masked, and with half
  of them masked, against the sampled captions' all-right share: a high half-masked accuracy with poor sampled
  captions points at the sampler's order of commits, a low one at the model.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from unialign_core import caption, load_model
from unialign_core.model import caption_ids
from unialign_core.modes import _generator

from . import evaluate as ev
from .scorecard import SAMPLING, TEXT, _generate_chunk, _tensor, records
from .world import FULL, Scene

SIGMAS = (0.2, 0.5, 0.8, 1.0)


def _errors(model, target, variants: dict, seed: int) -> dict:
    """x0-MSE per sigma for each variant (context, conditions) on the same noise."""
    g = torch.Generator().manual_seed(seed)
    n = target.shape[0]
    out = {name: [] for name in variants}
    with torch.no_grad():
        for sigma in SIGMAS:
            noise = torch.randn(target.shape, generator=g).to(target)
            x_t = (1 - sigma) * target + sigma * noise
            t = torch.full((n,), sigma * 1000.0, device=target.device, dtype=target.dtype)
            for name, (context, conditions) in variants.items():
                v = model.transformer(x_t, context, t, conditions, compute_text=False).velocity
                out[name].append(round(float(((x_t - sigma * v - target) ** 2).mean()), 4))
    return out


def diagnose(model, n: int = 50, seed: int = 0, vocab=None) -> dict:
    result = {"split": "val", "n": n, "sigmas": list(SIGMAS)}
    dev = model.device

    def latents(images):
        return torch.cat([model.encode_images(_tensor(im).to(dev), _generator(i)) for i, im in enumerate(images)])

    t2i = records("t2i", n, seed, "val", vocab or FULL)
    target = latents([t for _, _, t in t2i])
    context = model.encode_prompts([r["prompt"] for r, _, _ in t2i])
    null = model.encode_prompts([" "] * n)
    result["t2i_text_use"] = _errors(
        model,
        target,
        {"true prompt": (context, None), "other prompt": (context.roll(1, 0), None), "empty prompt": (null, None)},
        seed,
    )

    edits = records("edit", n, seed, "val", vocab or FULL)
    source = latents([s[0] for _, s, _ in edits])
    target = latents([t for _, _, t in edits])
    context = model.encode_prompts([r["instruction"] for r, _, _ in edits])
    result["edit_source_use"] = _errors(
        model,
        target,
        {
            "true source": (context, [source]),
            "other source": (context, [source.roll(1, 0)]),
            "no source": (context, None),
        },
        seed,
    )
    result["edit_copy_source_mse"] = round(float(((source - target) ** 2).mean()), 4)
    blank = [(dict(r, instruction=" "), s, t) for r, s, t in edits]
    outs = _generate_chunk(model, "edit", blank, range(seed, seed + n), SAMPLING)
    result["edit_identity_kept"] = float(
        np.mean([ev.read_scene(o) == Scene.from_dict(r["meta"]["source_scene"]) for (r, _, _), o in zip(edits, outs)])
    )

    caps = records("caption", n, seed, "val", vocab or FULL)
    pixels = torch.cat([_tensor(s[0]) for _, s, _ in caps])
    lat = model.encode_images(pixels.to(dev), _generator(seed))
    rows = [caption_ids(model.tokenizer, "caption", "", r["caption"], model.text_length) for r, _, _ in caps]
    ids = torch.tensor([row[0] for row in rows], device=dev)
    real = torch.tensor([row[2] for row in rows], device=dev)
    g = torch.Generator().manual_seed(seed)
    accuracy = {}
    for name, share in (("all masked", 1.0), ("half masked", 0.5)):
        hide = (torch.rand(ids.shape, generator=g) < share).to(dev) & real
        x = torch.where(hide, torch.full_like(ids, model.mask_id), ids)
        with torch.no_grad():
            logits = model.transformer(lat, model.encode_ids(x), torch.zeros(n, device=dev), compute_image=False)
        right = (logits.text_logits.argmax(-1) == ids) & hide
        accuracy[name] = round(float(right.sum() / hide.sum().clamp_min(1)), 4)
    texts = caption(model, pixels, seed=seed, resize="as_is", **TEXT)
    accuracy["sampled all right"] = float(
        np.mean([ev.score_caption(t, Scene.from_dict(r["meta"]["scene"]))["all"] for t, (r, _, _) in zip(texts, caps)])
    )
    result["caption_teacher_forced"] = accuracy
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.shapes.diagnose", description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(diagnose(load_model(args.model), args.n, args.seed), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
