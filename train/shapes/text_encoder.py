"""A small T5 text encoder for the shapes world (stage 4 of ``python -m train.shapes``, with the tokenizer).

UniAlignment keeps its T5-XXL frozen and leans on what pretraining put into it: where each token sits and what
its neighbours say. A randomly initialised T5 has neither (T5 has no absolute positions, and a random relative
bias barely tells positions apart), so the masked-diffusion text stream could not tell one masked slot from
the next. This stage gives the toy T5 a short pretraining of its own: masked-token prediction on the world's
texts (captions, prompts, instructions, VQA prompts with answers) at random mask rates, with a linear head
that is thrown away afterwards. The trainer then keeps the encoder frozen, as with the real model.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import T5Config, T5EncoderModel

from unialign_core.modes import VQA_TEMPLATE

T5 = dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, feed_forward_proj="gated-gelu", dropout_rate=0.0,
          pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False)  # fmt: skip


def make_t5(vocab_size: int) -> T5EncoderModel:
    """A fresh toy T5 encoder."""
    return T5EncoderModel(T5Config(vocab_size=vocab_size, **T5))


def record_texts(record: dict) -> list[str]:
    """The texts of a native record, as the trainer and the modes will show them to T5."""
    texts = [record.get(k) for k in ("prompt", "instruction", "caption") if record.get(k)]
    if record.get("task") == "vqa":
        texts = [VQA_TEMPLATE.format(question=record["prompt"]) + record["caption"]]
    return texts


def pretrain_t5(
    tokenizer,
    texts: list[str],
    *,
    length: int,
    steps: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    progress=None,
) -> tuple[T5EncoderModel, dict]:
    """Masked-token pretraining of a toy T5 on ``texts``; returns (encoder in eval mode, stats).

    Each row is padded to ``length`` with EOS (how captions are laid out) or with pad (how prompts are), and a
    share t ~ U(0, 1) of its positions is replaced by the mask token; the loss is cross-entropy at the masked
    positions. ``progress(step, parts)`` is called after every step.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    texts = sorted(set(texts))
    mask_id = tokenizer.convert_tokens_to_ids(tokenizer.mask_token)
    rows = []
    for text in texts:
        ids = tokenizer(text)["input_ids"][:length]
        rows.append(ids + [tokenizer.eos_token_id] * (length - len(ids)))
        rows.append(ids + [tokenizer.pad_token_id] * (length - len(ids)))
    data = torch.tensor(rows)
    model = make_t5(len(tokenizer)).train()
    head = torch.nn.Linear(T5["d_model"], len(tokenizer))
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 30) * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(s / max(steps, 1), 1))))
    )
    parts = {}
    for step in range(steps):
        ids = data[torch.from_numpy(rng.integers(len(data), size=batch_size))]
        t = torch.from_numpy(rng.uniform(0.05, 1.0, size=(batch_size, 1))).float()
        masked = torch.from_numpy(rng.uniform(size=ids.shape)).float() < t
        logits = head(model(input_ids=torch.where(masked, mask_id, ids))[0])
        loss = F.cross_entropy(logits[masked], ids[masked])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        parts = {"loss": loss.item(), "acc": (logits[masked].argmax(-1) == ids[masked]).float().mean().item()}
        if progress is not None:
            progress(step + 1, parts)
    return model.eval().requires_grad_(False), dict(parts, steps=steps, texts=len(texts))
