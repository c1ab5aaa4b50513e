"""The UniAlignment nodes. Thin: they translate ComfyUI types and services and call unialign_core."""

from .loaders import UniAlignLoader, UniAlignLoRA
from .model_files import register_folders
from .sampling import UniAlignCompose, UniAlignEdit, UniAlignPerceive, UniAlignTextToImage
from .understand import UniAlignUnderstand

register_folders()

# Node ids are stable: saved workflows refer to them.
NODE_CLASS_MAPPINGS = {
    "UniAlignLoader": UniAlignLoader,
    "UniAlignLoRA": UniAlignLoRA,
    "UniAlignTextToImage": UniAlignTextToImage,
    "UniAlignEdit": UniAlignEdit,
    "UniAlignPerceive": UniAlignPerceive,
    "UniAlignCompose": UniAlignCompose,
    "UniAlignUnderstand": UniAlignUnderstand,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "UniAlignLoader": "UniAlign Loader",
    "UniAlignLoRA": "UniAlign LoRA",
    "UniAlignTextToImage": "UniAlign Text to Image",
    "UniAlignEdit": "UniAlign Edit",
    "UniAlignPerceive": "UniAlign Perceive (depth / edges / pose)",
    "UniAlignCompose": "UniAlign Compose / Personalise",
    "UniAlignUnderstand": "UniAlign Understand (caption / VQA)",
}

# The native path (UniAlignment as a ComfyUI MODEL): its import must never take the pack down.
try:
    from . import native as _native
except Exception as _error:  # noqa: BLE001
    import logging

    logging.getLogger("UniAlignment").warning("[UniAlign] the native nodes are not available: %s", _error)
else:
    NODE_CLASS_MAPPINGS.update(_native.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_native.NODE_DISPLAY_NAME_MAPPINGS)
