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
