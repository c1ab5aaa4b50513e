"""The training step of the full-size rehearsal (`python -m tools.rehearse`), in its own process.

    python -m tools.rehearse_train --root DIR/files --result step_train.json [--device cpu]

One LoRA optimizer step as `train/loop.py` takes it (`train.step.TrainStep`), on the rehearsal's files: the model
loaded by `load_model` (our single file in bf16, the fp8 T5, the VAE file), fresh alignment projectors of
Qwen2.5-VL-7B's width (3584) at block 8, LoRA (the trainer's default targets and rank), gradient checkpointing,
bf16 autocast, the losses with all four terms at the published weights, backward, clipping at 2.0, AdamW and the
schedule step.

What is real and what stands in: T5 runs for real (the prompt, " " for text dropout, and the re-encoding of the
masked caption ids, as the loop does on every micro-step). The VAE latents and the teacher features are cached
stand-ins: random tensors of the shapes the trainer's `data.cache_dir` gives back (VAE moments of a 512 px image;
Qwen2.5-VL-7B image and text features), so no teacher is loaded. With batch 1 the contrastive term has no
negatives and is 0, but it is computed and back-propagated.

It lives in `train/` because `unialign_core` must not import the trainer; the rehearsal runs this module as a
process only where the `train` package is present.
"""

import argparse
import json
import os
import sys
import time

import torch

TEACHER_DIM = 3584  # Qwen2.5-VL-7B's hidden size
ALIGN_BLOCK = 8
SIDE = 512
LENGTH = 256


def run(paths: dict, device: str = "cpu") -> dict:
    from tools.rehearse import load_for_modes, progress, weights_held
    from train.config import Config, LossConfig
    from train.init import add_projectors
    from train.lora import apply_lora
    from train.losses import Prepared, Reducer, SampleRNG, TrainModule
    from train.optim import make_optimizer_and_schedule
    from train.step import TrainStep

    started = time.perf_counter()
    model = load_for_modes(paths, device)
    load_s = time.perf_counter() - started
    progress("loaded")
    transformer = model.transformer
    add_projectors(transformer, TEACHER_DIM)
    cfg = Config()
    cfg.train.mode, cfg.train.lr, cfg.train.warmup_steps, cfg.train.max_steps = "lora", 1e-4, 0, 1
    cfg.train.gradient_checkpointing = True
    apply_lora(transformer, cfg)
    transformer.enable_gradient_checkpointing()
    transformer.train()
    module = TrainModule(transformer)
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer_and_schedule(trainable, cfg)
    dtype = torch.bfloat16

    step_started = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    latent = SIDE // model.vae_scale
    with torch.no_grad():
        prompt = model.encode_prompts(["a red fox in the snow"], LENGTH)
        null = model.encode_prompts([" "], LENGTH)
    ids = model.tokenize(["a red fox standing in deep snow, its breath visible in the cold air"], LENGTH).to(device)
    not_pad = torch.zeros_like(ids, dtype=torch.bool)
    first_eos = int((ids[0] == model.eos_id).nonzero()[0])
    not_pad[:, : first_eos + 1] = True
    image = (torch.randn(1, 16, latent, latent, generator=gen)).to(device, dtype)  # cached VAE latents stand-in
    batch = Prepared(
        target=image, conditions=[], prompt_context=prompt.to(dtype), null_context=null.to(dtype), understand=image,
        ids=ids, maskable=torch.ones_like(ids, dtype=torch.bool), not_pad=not_pad,
        caption_valid=torch.ones(1, dtype=torch.bool, device=device),
        sample_valid=torch.ones(1, dtype=torch.bool, device=device),
        teacher_image=torch.randn(1, TEACHER_DIM, generator=gen).to(device),  # cached teacher features stand-in
        teacher_text=torch.randn(1, TEACHER_DIM, generator=gen).to(device))  # fmt: skip

    def encode_ids(x):
        return model.text_encoder(input_ids=x.to(device))[0].to(dtype)

    timings, grads = {}, []

    def forward_done():
        timings["forward_s"] = time.perf_counter() - step_started
        progress("forward done (T5 encodes, image pass, text pass, losses)")

    def backward_done():
        progress("backward done")
        grads.extend(p.grad for p in trainable if p.grad is not None)

    train_step = TrainStep(
        module,
        optimizer,
        LossConfig(),
        encode_ids,
        model.mask_id,
        clip=lambda: torch.nn.utils.clip_grad_norm_(trainable, cfg.train.grad_clip),
        reducer=Reducer(),
        block=min(ALIGN_BLOCK, transformer.config.num_layers),
        forward_context=lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16),
    )
    logged, grad_norm = train_step(
        batch, SampleRNG(0, 0, [0], 1), after_forward=forward_done, after_backward=backward_done
    )
    grad_norm = float(grad_norm)
    scheduler.step()
    forward_s = timings["forward_s"]
    run_s = time.perf_counter() - step_started
    return {
        "load_s": load_s,
        "run_s": run_s,
        "forward_s": forward_s,
        "backward_and_update_s": run_s - forward_s,
        "losses": {k: float(v) for k, v in logged.items()},
        "trainable_parameters": sum(p.numel() for p in trainable),
        "with_gradient": len(grads),
        "trainable_tensors": len(trainable),
        "grad_norm": grad_norm,
        "weights_bytes": weights_held(transformer, model.text_encoder, model.vae),
        "stand_ins": "VAE latents and teacher features: cached stand-ins (random, cache shapes); T5: real (fp8)",
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.rehearse_train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="the rehearsal's files folder (with paths.json)")
    parser.add_argument("--result", required=True, help="JSON file to write the figures to")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    from tools import rehearse

    rehearse._PROGRESS["path"] = args.result + ".progress"
    _status_bytes = rehearse._status_bytes

    with open(os.path.join(args.root, "paths.json")) as f:
        paths = json.load(f)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        details, ok, error = run(paths, args.device), True, None
    except Exception as e:  # recorded in the report
        import traceback

        traceback.print_exc()
        details, ok, error = {}, False, f"{type(e).__name__}: {e}"
    details["seconds"] = time.perf_counter() - started
    details["vmhwm_bytes"] = _status_bytes("VmHWM")
    if args.device == "cuda":
        details["peak_vram_bytes"] = torch.cuda.max_memory_allocated()
    with open(args.result, "w") as f:
        json.dump({"ok": ok, "error": error, "details": details}, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
