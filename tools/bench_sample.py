"""Speed and memory benchmark on a random-weight model (weights do not change the cost).

    python -m tools.bench_sample                 # small config on the CPU
    python -m tools.bench_sample --size full     # SD3-medium + T5-XXL sizes (needs a GPU)

Reports time per denoising step and per whole text-to-image, time per caption for each
sampler with the split between T5 and the transformer per step, and peak memory.
"""

import argparse
import json
import resource
import time

import torch

from tools import random_models
from tools.random_models import sync
from unialign_core.model import DTYPES, UniAlignModel
from unialign_core.modes import caption, text_to_image
from unialign_core.text_sampler import TextDenoiser

SIZES = {
    "small": dict(
        transformer=dict(layers=4, heads=4, head_dim=64, joint_dim=256, pos_embed_max_size=64, vocab=1000),
        t5=dict(width=256, layers=4, vocab=1000),
        vae=dict(block_out_channels=[32, 32, 64, 64], norm_num_groups=16, layers_per_block=1),
        image=256, caption_length=128,
    ),
    "full": dict(
        transformer=dict(),  # the defaults are SD3-medium
        t5=dict(width=4096, d_ff=10240, layers=24, vocab=32128),
        vae=dict(),
        image=512, caption_length=256,
    ),
}  # fmt: skip


def random_model(size: str, device: str, dtype: torch.dtype) -> UniAlignModel:
    spec = SIZES[size]
    return random_models.random_model(
        transformer=spec["transformer"], t5=spec["t5"], vae=spec["vae"], device=device, dtype=dtype,
        name=f"random-{size}",
    )  # fmt: skip


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def peak_memory_mb(device) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run(size: str, device: str, dtype: torch.dtype, steps: int, caption_steps: int) -> dict:
    torch.manual_seed(0)
    model = random_model(size, device, dtype)
    spec = SIZES[size]
    side, length = spec["image"], spec["caption_length"]
    prompt = "w1 w2 w3 w4 w5"
    text_to_image(model, prompt, width=side, height=side, steps=1)  # warm-up
    step_times = []
    last = [time.perf_counter()]

    def on_step(i, n, x0):
        sync(device)
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    _, t2i_total = timed(
        lambda: text_to_image(model, prompt, width=side, height=side, steps=steps, callback=on_step), device
    )
    image = torch.rand(1, 3, side, side)
    latents = model.encode_images(image.to(device))

    # One denoiser call, split into T5 and transformer.
    ids = torch.full((1, length), model.mask_id, device=device)
    context, t5_time = timed(lambda: model.encode_ids(ids), device)
    zero = torch.zeros(1, device=device)
    _, dit_time = timed(lambda: model.transformer(latents, context, zero, compute_image=False), device)

    results = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "size": size,
        "dtype": str(dtype).replace("torch.", ""),
        "t2i": {"image": f"{side}x{side}", "steps": steps, "cfg": True,
                "s_per_step_median": sorted(step_times)[len(step_times) // 2], "s_total": t2i_total},
        "understanding_call": {"tokens": length, "s_t5": t5_time, "s_transformer": dit_time,
                               "t5_share": t5_time / (t5_time + dit_time)},
        "caption": {},
    }  # fmt: skip
    for sampler, n in (("ddpm_cache", length), ("confidence", length), ("confidence", length // 4)):
        before = TextDenoiser.total_calls
        _, seconds = timed(
            lambda n=n, sampler=sampler: caption(model, image, answer_tokens=n, steps=caption_steps, sampler=sampler),
            device,
        )
        calls = TextDenoiser.total_calls - before
        results["caption"][f"{sampler}@{n}"] = {"s": seconds, "forward_passes": calls}
    base = results["caption"][f"ddpm_cache@{length}"]["s"]
    for entry in results["caption"].values():
        entry["speedup_vs_ddpm_cache"] = base / entry["s"]
    results["peak_memory_mb"] = peak_memory_mb(device)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None)
    parser.add_argument("--steps", type=int, default=28, help="text-to-image steps")
    parser.add_argument("--caption-steps", type=int, default=32)
    args = parser.parse_args(argv)
    dtype_name = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    print(json.dumps(run(args.size, args.device, dtype, args.steps, args.caption_steps), indent=2))


if __name__ == "__main__":
    main()
