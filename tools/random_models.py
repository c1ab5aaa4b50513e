"""Random-weight models for the benchmarks and the rehearsal (weights do not change the cost), built from sizes.

    transformer = random_transformer(layers=4, heads=4, head_dim=64, joint_dim=256, vocab=1000)
    model = random_model(transformer=dict(layers=4, ...), t5=dict(width=256, layers=4, vocab=1000), vae={})

Nothing is downloaded or read. `sync` waits for a GPU's queued work (a no-op on the CPU), for timings.
"""

from typing import Optional

import torch
from diffusers import AutoencoderKL
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

from unialign_core.loader import DEFAULT_SCHEDULER
from unialign_core.model import UniAlignModel
from unialign_core.transformer import UniAlignTransformer
from unialign_core.vae import SD3_VAE_CONFIG


def random_transformer(
    *,
    layers: int = 24,
    heads: int = 24,
    head_dim: int = 64,
    joint_dim: int = 4096,
    vocab: int = 32100,
    pos_embed_max_size: int = 192,
    **config,
) -> UniAlignTransformer:
    """A UniAlignTransformer of `layers` blocks of `heads` x `head_dim` (the text projection as wide), reading text
    states `joint_dim` wide, with a text head of `vocab`; `config`: its other arguments (e.g. align_dim). The
    defaults are SD3-medium's sizes."""
    return UniAlignTransformer(
        num_layers=layers,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        joint_attention_dim=joint_dim,
        caption_projection_dim=heads * head_dim,
        pos_embed_max_size=pos_embed_max_size,
        vocab_size=vocab,
        **config,
    )


def random_t5(*, width: int, layers: int, vocab: int, d_ff: Optional[int] = None, d_kv: int = 64) -> T5EncoderModel:
    """A gated-GELU T5 encoder `width` wide (heads of `d_kv`; feed-forward `d_ff`, default twice the width)."""
    config = T5Config(
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        d_model=width,
        d_kv=d_kv,
        d_ff=2 * width if d_ff is None else d_ff,
        num_layers=layers,
        num_heads=width // d_kv,
        vocab_size=vocab,
    )
    return T5EncoderModel(config)


def random_vae(**config) -> AutoencoderKL:
    """SD3's AutoencoderKL, with `config` overriding its entries (e.g. narrower blocks)."""
    return AutoencoderKL(**dict(SD3_VAE_CONFIG, **config))


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with T5's special ids (pad 0, eos 1, unk 2) and a mask token last."""
    words = ["<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(vocab_size - 4)] + ["<extra_id_0>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def random_model(
    *,
    transformer: dict,
    t5: dict,
    vae: Optional[dict] = None,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    name: str = "random",
) -> UniAlignModel:
    """A UniAlignModel of random weights in eval mode: `random_transformer(**transformer)`, `random_t5(**t5)`,
    `random_vae(**vae)` (None: no VAE, for samplers that take latents), built on `device` in that order, in `dtype`;
    a `word_tokenizer` of the text head's size, its last id the mask."""
    with torch.device(device):
        dit = random_transformer(**transformer).to(dtype).eval()
        encoder = random_t5(**t5)
        autoencoder = None if vae is None else random_vae(**vae)
    encoder = encoder.to(dtype).eval()
    if autoencoder is not None:
        autoencoder = autoencoder.to(dtype).eval()
    vocab = dit.config.vocab_size
    return UniAlignModel(dit, autoencoder, encoder, word_tokenizer(vocab), DEFAULT_SCHEDULER, vocab - 1, name)


def sync(device) -> None:
    """Wait for the work queued on `device` when it is a GPU (for timings)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
