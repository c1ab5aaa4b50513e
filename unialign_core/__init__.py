"""unialign_core: the UniAlignment model, its loader, samplers and modes. No ComfyUI imports."""

from .errors import Cancelled, CheckpointError, InputError
from .loader import load_model, load_tokenizer, load_transformer
from .lora import load_lora, lora_deltas, merge_lora, save_lora
from .model import DTYPES, UniAlignModel
from .modes import (
    PERCEPTION_PRESETS,
    ImageResult,
    answer,
    caption,
    compose,
    edit,
    perceive,
    text_to_image,
)
from .single_file import save_single_file
from .text_encoder import load_mask_embedding, load_text_encoder
from .transformer import TransformerOutput, UniAlignTransformer
from .vae import load_vae

__all__ = [
    "Cancelled",
    "CheckpointError",
    "DTYPES",
    "ImageResult",
    "InputError",
    "PERCEPTION_PRESETS",
    "TransformerOutput",
    "UniAlignModel",
    "UniAlignTransformer",
    "answer",
    "caption",
    "compose",
    "edit",
    "load_lora",
    "load_mask_embedding",
    "load_model",
    "load_text_encoder",
    "load_tokenizer",
    "load_transformer",
    "load_vae",
    "lora_deltas",
    "merge_lora",
    "perceive",
    "save_lora",
    "save_single_file",
    "text_to_image",
]
