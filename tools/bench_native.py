"""EasyCache on the native MODEL: its speed-up and how much it changes the image, on a fixed seed.

    COMFYUI_0364_DIR=/work/comfyui_0364 OMP_NUM_THREADS=1 /work/comfy364_venv/bin/python tools/bench_native.py
    ... tools/bench_native.py --model random --side 256 --steps 28      # a larger random-weight model

Runs ComfyUI's KSampler (euler, "normal", CFG) on UniAlign Native Model twice per setting, with the same seed and
prompt: plain, and through core's EasyCache node (reuse_threshold / start / end as given; ComfyUI's defaults
0.2 / 0.15 / 0.95). Prints the median time of a run, the speed-up, how many transformer calls each made, and the
difference of the results: latents (max |diff|) and the images our VAE decodes from them (max and mean |diff| in
0..1, PSNR). `--model tiny` is the golden test model (tests/data/golden), `random` a random-weight model of the
sizes given (tools/random_models.py): weights do not change the cost, but a random model's velocity field is not a
trained one's, so EasyCache's reuse decisions (and the image difference) only indicate what it does on the real
model. ComfyUI is imported from COMFYUI_0364_DIR (a ComfyUI 0.3.x; tools/setup_comfyui.sh).
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "data" / "golden" / "tiny_unialignment"
PACK = "unialign_bench_pack"
PROMPT = "a red cube on a wooden table"
NEGATIVE = ""


def import_comfy():
    path = os.environ.get("COMFYUI_0364_DIR") or os.environ.get("COMFYUI_DIR")
    if not path or not (Path(path) / "comfy" / "model_sampling.py").is_file():
        raise SystemExit("set COMFYUI_0364_DIR to a ComfyUI 0.3.x folder (tools/setup_comfyui.sh)")
    sys.path[:0] = [path, str(REPO), str(REPO / "tests")]
    import comfy.cli_args

    comfy.cli_args.args.cpu = not torch.cuda.is_available()
    import comfy.model_management  # noqa: F401  (after --cpu)

    import nodes as comfy_nodes
    from nodes_support import import_pack  # tests/: the pack imported as ComfyUI imports a custom-node folder

    import_pack(PACK)
    return comfy_nodes


def pack(name):
    return sys.modules[f"{PACK}.{name}"]


def tiny_handle():
    return pack("nodes.model_cache").load_handle("tiny", str(GOLDEN), None, None, torch.float32)


def random_handle(args):
    """A UNIALIGN_MODEL handle of a random-weight model (as load_handle makes one from a file)."""
    import comfy.model_management as mm
    import comfy.model_patcher

    from tools.random_models import random_model

    cache = pack("nodes.model_cache")
    model = random_model(
        transformer=dict(layers=args.layers, heads=args.heads, head_dim=64, joint_dim=256, vocab=1000),
        t5=dict(width=256, layers=2, vocab=1000),
        vae=dict(block_out_channels=[32, 32, 64, 64]),  # SD3's depth (x8), narrower: a quick decode
    )
    load, offload = mm.get_torch_device(), mm.unet_offload_device()
    patcher = comfy.model_patcher.ModelPatcher(cache.UniAlignWeights(model), load_device=load, offload_device=offload)
    t5 = comfy.model_patcher.ModelPatcher(cache.TextEncoderWeights(model), load_device=load, offload_device=offload)
    return cache.UniAlignHandle(model, patcher, ("random",), "random", t5_patcher=t5)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "random"], default="tiny")
    parser.add_argument("--layers", type=int, default=8, help="random model: transformer blocks")
    parser.add_argument("--heads", type=int, default=8, help="random model: heads of 64")
    parser.add_argument("--side", type=int, default=None, help="image side in pixels (tiny: 64, random: 256)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each setting (median)")
    parser.add_argument("--threshold", type=float, nargs="+", default=[0.2], help="EasyCache reuse_threshold(s)")
    parser.add_argument("--start", type=float, default=0.15)
    parser.add_argument("--end", type=float, default=0.95)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    comfy_nodes = import_comfy()
    from comfy_extras.nodes_easycache import EasyCacheNode

    handle = tiny_handle() if args.model == "tiny" else random_handle(args)
    side = args.side or (64 if args.model == "tiny" else 256)
    native = pack("nodes.native")
    vae_module = pack("unialign_core.vae")
    model = native.UniAlignNativeModel().convert(handle)[0]
    positive = native.UniAlignNativeTextEncode().encode(handle, PROMPT)["result"][0]
    negative = native.UniAlignNativeTextEncode().encode(handle, NEGATIVE)["result"][0]
    scale = handle.model.pixel_multiple // handle.model.transformer.config.patch_size  # the VAE's factor
    channels = handle.model.transformer.config.in_channels
    latent = {"samples": torch.zeros(1, channels, side // scale, side // scale)}
    calls = {"n": 0}
    handle.model.transformer.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))

    def run(m):
        calls["n"] = 0
        started = time.perf_counter()
        (out,) = comfy_nodes.KSampler().sample(
            m, args.seed, args.steps, args.cfg, "euler", "normal", positive, negative, latent, denoise=1.0
        )
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out["samples"], time.perf_counter() - started, calls["n"]

    def timed(m):
        run(m)  # warm-up (loads the model, first-call costs)
        results = [run(m) for _ in range(args.repeats)]
        return results[-1][0], statistics.median(r[1] for r in results), results[-1][2]

    def image(raw):
        with torch.no_grad():
            return vae_module.decode(handle.model.vae, handle.model.scale_latents(raw.float()))

    params = sum(p.numel() for p in handle.model.transformer.parameters())
    device = torch.device(handle.patcher.load_device)
    print(f"model {args.model} ({params / 1e6:.1f}M transformer parameters), {side}x{side} px, {args.steps} steps, "
          f"cfg {args.cfg}, seed {args.seed}, device {device}, torch threads {torch.get_num_threads()}")  # fmt: skip
    plain, t_plain, n_plain = timed(model)
    print(f"plain:     {t_plain:7.3f} s/run, {n_plain} transformer calls")
    plain_image = image(plain)
    for threshold in args.threshold:
        cached_model = EasyCacheNode.execute(model, threshold, args.start, args.end, False).args[0]
        cached, t_cached, n_cached = timed(cached_model)
        diff = (image(cached) - plain_image).abs()
        mse = float((diff**2).mean())
        psnr = float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()
        print(
            f"EasyCache {threshold:g} ({args.start:g}-{args.end:g}): {t_cached:7.3f} s/run, {n_cached} transformer "
            f"calls, speed-up x{t_plain / t_cached:.2f}; latents max |diff| {(cached - plain).abs().max():.3g}; "
            f"image max |diff| {diff.max():.3g}, mean {diff.mean():.3g}, PSNR {psnr:.1f} dB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
