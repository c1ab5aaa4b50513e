"""Validation during training: the `validation` section's prompts drawn and images captioned with the model as it
trains, written to `<run_dir>/validation/step_<n>/` (and to TensorBoard)."""

import logging
import os

import torch

from unialign_core import UniAlignModel, caption, text_to_image
from unialign_core.images import to_pil

from .buckets import image_to_tensor, load_image, resize_to_bucket
from .checkpointing import full_model_state

log = logging.getLogger("train")


@torch.no_grad()
def validate(trainer):
    """Run the validation of `trainer`'s current step (every process calls it; rank 0 draws and writes)."""
    cfg, acc = trainer.cfg.validation, trainer.accelerator
    if trainer.params_sharded:
        log.warning("validation: skipped with ZeRO-3 (sharded parameters); export a checkpoint and run the modes on it")
        return
    full = full_model_state(trainer) if trainer.fsdp else None  # FSDP: gathered (a collective), rank 0 only
    if trainer.main:
        folder = os.path.join(trainer.run_dir, "validation", f"step_{trainer.step:08d}")
        os.makedirs(folder, exist_ok=True)
        transformer = trainer.transformer
        if trainer.fsdp:  # the unsharded twin with the gathered weights
            transformer = trainer.validation_copy
            transformer.load_state_dict(full)
            transformer.to(trainer.device)
            del full
        bundle = trainer.bundle
        view = UniAlignModel(
            transformer,
            bundle.vae,
            bundle.text_encoder,
            bundle.tokenizer,
            bundle.scheduler_config,
            bundle.mask_id,
            "training",
        )
        transformer.eval()
        lines = []
        with acc.autocast():
            for i, prompt in enumerate(cfg.prompts):
                res = text_to_image(
                    view,
                    prompt,
                    width=cfg.width,
                    height=cfg.height,
                    steps=cfg.steps,
                    guidance=cfg.guidance,
                    seed=cfg.seed,
                    text_length=trainer.cfg.data.text_length,
                )
                to_pil(res.images[:1])[0].save(os.path.join(folder, f"t2i_{i:02d}.png"))
                if trainer.tb is not None:
                    trainer.tb.add_image(f"val/t2i_{i:02d}", res.images[0], trainer.step)
            for path in cfg.images:
                pil = load_image(path)
                m = bundle.pixel_multiple
                pil = resize_to_bucket(pil, (max(m, pil.width // m * m), max(m, pil.height // m * m)))
                text = caption(
                    view, image_to_tensor(pil)[None], answer_tokens=cfg.caption_length, steps=16, seed=cfg.seed
                )[0]
                lines.append(f"{os.path.basename(path)}\t{text}")
                if trainer.tb is not None:
                    trainer.tb.add_text(f"val/caption/{os.path.basename(path)}", text, trainer.step)
        with open(os.path.join(folder, "captions.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + ("\n" if lines else ""))
        if trainer.fsdp:
            transformer.to("cpu")
        transformer.train()
        log.info("validation written to %s", folder)
    acc.wait_for_everyone()
