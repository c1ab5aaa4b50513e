"""Side-by-side speed of the understanding samplers on random weights (weights do not change the cost per pass).

    python -m tools.bench_understand                     # the issue's CPU config, 256 and 1024 image tokens
    python -m tools.bench_understand --image-tokens 256 --refresh 1 4 8 --threshold 0.9 --threads 1

Times, in one process on the same weights and the same clean image latents (no VAE: both sides would pay the same
encode once), the official algorithm (`ddpm_cache`, parity-tested, every pass a full pass) against the
confidence sampler with the image-stream cache refreshed every N steps and with threshold commits. Each row
reports seconds, forward passes (full / text-only) and the speed ratio against `ddpm_cache`.

On random weights nothing is confident, so a threshold commits no more than the top-k schedule: its gain is
measured on a trained model (`train/shapes/sampler_quality.py`). The cache's cost is checked here by the
`logit_drift` figure: along the exact (refresh 1) trajectory, the largest difference in the last step's logits
between a full pass and a text-only pass over the image keys and values cached N-1 steps earlier, and the share
of masked positions whose most likely token changes.
"""

import argparse
import json
import time

import torch

from tools import random_models
from tools.random_models import sync
from unialign_core.model import DTYPES, UniAlignModel
from unialign_core.text_sampler import CachedTextDenoiser, TextDenoiser, sample_confidence, sample_ddpm_cache

CONFIG = dict(layers=6, heads=4, head_dim=64, t5_layers=4, vocab=1000)  # DiT 6 x 256, T5 4 x 256


def random_model(
    layers=6, heads=4, head_dim=64, t5_layers=4, vocab=1000, device="cpu", dtype=torch.float32
) -> UniAlignModel:
    """A random UniAlignModel without a VAE (the samplers take latents)."""
    torch.manual_seed(0)
    width = heads * head_dim
    return random_models.random_model(
        transformer=dict(layers=layers, heads=heads, head_dim=head_dim, joint_dim=width, pos_embed_max_size=96,
                         vocab=vocab),
        t5=dict(width=width, layers=t5_layers, vocab=vocab), device=device, dtype=dtype,
    )  # fmt: skip


def _latents(model, image_tokens: int, batch: int = 1) -> torch.Tensor:
    side = int(round(image_tokens**0.5)) * model.transformer.config.patch_size
    if (side // model.transformer.config.patch_size) ** 2 != image_tokens:
        raise ValueError(f"--image-tokens must be a square number (256 = 256 px, 1024 = 512 px); got {image_tokens}")
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(batch, model.transformer.config.in_channels, side, side, generator=g)
    return noise.to(model.device, model.dtype)


def run_setting(model, latents, length, steps, sampler, refresh=1, threshold=None, seed=0):
    """(ids, seconds, passes, full passes) of one caption of the latents' images."""
    x = torch.full((latents.shape[0], length), model.mask_id, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    sync(model.device)
    start = time.perf_counter()
    before = TextDenoiser.total_calls
    if sampler == "ddpm_cache":
        denoiser = TextDenoiser(model, latents)
        ids = sample_ddpm_cache(denoiser, x, model.mask_id, steps, generator)
        full = TextDenoiser.total_calls - before
    else:
        denoiser = CachedTextDenoiser(model, latents, refresh)
        ids = sample_confidence(denoiser, x, model.mask_id, model.eos_id, steps, generator, threshold=threshold)
        full = denoiser.full_passes
    sync(model.device)
    return ids, time.perf_counter() - start, TextDenoiser.total_calls - before, full


@torch.no_grad()
def pass_costs(model, latents, length, repeat=5) -> dict:
    """Fastest of `repeat` runs of each part of one denoiser call: T5, a full transformer pass, a text-only pass."""
    ids = torch.full((latents.shape[0], length), model.mask_id, dtype=torch.long)
    zero = torch.zeros(latents.shape[0], device=model.device)
    context = model.encode_ids(ids)
    _, cache = model.transformer.forward_with_image_cache(latents, context, zero, compute_image=False)
    parts = {
        "s_t5": lambda: model.encode_ids(ids),
        "s_full_transformer": lambda: model.transformer(latents, context, zero, compute_image=False),
        "s_text_only_transformer": lambda: model.transformer.forward_text(context, zero, cache),
    }
    costs = {}
    for name, fn in parts.items():
        fn()
        times = []
        for _ in range(repeat):
            sync(model.device)
            start = time.perf_counter()
            fn()
            sync(model.device)
            times.append(time.perf_counter() - start)
        costs[name] = min(times)
    return costs


@torch.no_grad()
def logit_drift(model, latents, length, steps, refreshes):
    """Along the exact trajectory: last-step logits of a full pass vs a text-only pass on an older cache."""
    x = torch.full((latents.shape[0], length), model.mask_id, dtype=torch.long)
    states = []
    denoiser = TextDenoiser(model, latents)

    def record(ids, rows=None):
        states.append(ids.clone())
        return denoiser(ids, rows)

    sample_confidence(record, x, model.mask_id, model.eos_id, steps)
    zero = torch.zeros(latents.shape[0], device=model.device)
    last = states[-1]
    context = model.encode_ids(last)
    exact = model.transformer(latents, context, zero, compute_image=False).text_logits.float()
    masked = (last == model.mask_id).to(exact.device)
    drift = {}
    for n in refreshes:
        if n == 1:
            continue
        built_at = ((len(states) - 1) // n) * n  # the step of the last refresh with refresh = n
        _, cache = model.transformer.forward_with_image_cache(
            latents, model.encode_ids(states[built_at]), zero, compute_image=False
        )
        approx = model.transformer.forward_text(context, zero, cache).text_logits.float()
        changed = (approx.argmax(-1) != exact.argmax(-1))[masked]
        drift[f"refresh {n}"] = {
            "cache_age_steps": len(states) - 1 - built_at,
            "max_abs_logit_diff": (approx - exact).abs().max().item(),
            "logit_scale_max_abs": exact.abs().max().item(),
            "argmax_changed_share_of_masked": changed.float().mean().item() if changed.numel() else 0.0,
        }
    return drift


def bench(image_tokens, length=256, steps=32, refreshes=(1, 4, 8), thresholds=(None, 0.9), device="cpu",
          dtype=torch.float32, batch=1, drift=True, repeat=1):  # fmt: skip
    """Each setting `repeat` times, interleaved (a busy machine slows all alike); the fastest run counts."""
    model = random_model(device=device, dtype=dtype, **CONFIG)
    latents = _latents(model, image_tokens, batch)
    run_setting(model, latents, 16, 2, "confidence")  # warm-up
    settings = [("ddpm_cache", 1, None)] + [("confidence", n, t) for t in thresholds for n in refreshes]
    best = {}
    for _ in range(repeat):
        for setting in settings:
            _, s, passes, full = run_setting(model, latents, length, steps, *setting)
            best[setting] = min(best.get(setting, (s, passes, full)), (s, passes, full))
    rows = []
    base = best[settings[0]][0]
    rows.append({"setting": "ddpm_cache (official)", "s": base, "passes": best[settings[0]][1],
                 "full_passes": best[settings[0]][2], "ratio": 1.0})  # fmt: skip
    for _, n, threshold in settings[1:]:
        s, passes, full = best[("confidence", n, threshold)]
        name = f"confidence, refresh {n}, threshold {threshold if threshold is not None else 'off'}"
        rows.append({"setting": name, "s": s, "passes": passes, "full_passes": full, "ratio": base / s})
    result = {"image_tokens": image_tokens, "text_tokens": length, "steps": steps, "batch": batch,
              "device": str(device), "dtype": str(dtype).replace("torch.", ""), "repeat": repeat,
              "threads": torch.get_num_threads(), "rows": rows}  # fmt: skip
    costs = result["pass_costs"] = pass_costs(model, latents, length)
    full_call = costs["s_t5"] + costs["s_full_transformer"]
    text_call = costs["s_t5"] + costs["s_text_only_transformer"]
    for row in rows:  # the ratio the passes imply, steadier than wall time on a shared machine
        row["s_from_pass_costs"] = row["full_passes"] * full_call + (row["passes"] - row["full_passes"]) * text_call
    for row in rows:
        row["ratio_from_pass_costs"] = rows[0]["s_from_pass_costs"] / row["s_from_pass_costs"]
    if drift:
        result["logit_drift"] = logit_drift(model, latents, length, steps, refreshes)
    return result


def markdown(results) -> str:
    lines = ["| image tokens | setting | s | passes (full) | ratio vs ddpm_cache | ratio from pass costs |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        for row in r["rows"]:
            lines.append(
                f"| {r['image_tokens']} | {row['setting']} | {row['s']:.2f} | {row['passes']} "
                f"({row['full_passes']}) | {row['ratio']:.2f}x | {row['ratio_from_pass_costs']:.2f}x |"
            )

    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-tokens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--length", type=int, default=256, help="text tokens")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--refresh", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument(
        "--threshold",
        type=float,
        nargs="+",
        default=None,
        help="thresholds to time besides 'off' (default: 0.9; 0 = none)",
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1, help="runs per setting, interleaved; the fastest counts")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (1 gives steadier figures on a busy machine)"
    )
    parser.add_argument("--no-drift", action="store_true", help="skip the logit-drift check")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    thresholds = [None] + (args.threshold if args.threshold is not None else [0.9])
    if args.threshold == [0]:
        thresholds = [None]  # --threshold 0: time the top-k schedule only
    results = []
    for tokens in args.image_tokens:
        results.append(bench(tokens, args.length, args.steps, args.refresh, thresholds, args.device, dtype,
                             args.batch, not args.no_drift, args.repeat))  # fmt: skip
        print(json.dumps(results[-1], indent=2), flush=True)
    print(markdown(results))


if __name__ == "__main__":
    main()
