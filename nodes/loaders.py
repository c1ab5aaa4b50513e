"""UniAlignLoader and UniAlignLoRA."""

import folder_paths

from ..unialign_core import CheckpointError
from . import services
from .image_types import InputError

CATEGORY = "UniAlignment"


class UniAlignLoader:
    DESCRIPTION = (
        "Loads a UniAlignment (or DualDiffusion) model: the transformer, the T5 text encoder, the SD3 VAE and "
        "the tokenizer. ComfyUI's model management moves it to the GPU when a UniAlign node runs and "
        "offloads it when another workflow needs the memory. A loaded model is reused while the files "
        "and the dtype stay the same, so changing a prompt never reloads it."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("UNIALIGN_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The loaded model, for the UniAlign LoRA and mode nodes.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (
                    services.list_models(),
                    {
                        "tooltip": "A file or folder in models/unialignment: our single .safetensors file (made with "
                        "`python -m unialign_core.convert` or by the trainer), or the upstream folder of "
                        "glimmer16/UniAlignment or a DualDiffusion model, as downloaded."
                    },
                ),
                "text_encoder": (
                    [services.FROM_MODEL] + services.list_text_encoders(),
                    {
                        "default": services.FROM_MODEL,
                        "tooltip": "The T5-XXL encoder. '(from model)' uses the one bundled in the single file or "
                        "the model folder's text_encoder/. Pick your existing t5xxl_fp16 (or fp8) file from "
                        "models/text_encoders to share it with SD3/Flux workflows.",
                    },
                ),
                "vae": (
                    [services.FROM_MODEL] + services.list_files("vae"),
                    {
                        "default": services.FROM_MODEL,
                        "tooltip": "The SD3 VAE. '(from model)' uses the one bundled in the single file or the "
                        "model folder's vae/. Otherwise pick an SD3 VAE file from models/vae.",
                    },
                ),
                "dtype": (
                    services.DTYPE_CHOICES,
                    {
                        "default": "auto",
                        "tooltip": "Weight precision. auto picks what ComfyUI picks for SD3 on this device (bf16 "
                        "on recent GPUs, fp32 on the CPU). fp16 keeps the VAE in fp32. fp32 needs ~2x the memory.",
                    },
                ),
                "weight_dtype": (
                    services.WEIGHT_DTYPE_CHOICES,
                    {
                        "default": "default",
                        "tooltip": "How the transformer's block weights are stored. default: in the dtype above. "
                        "fp8_e4m3fn / fp8_e5m2: in fp8 (about 2 GB less on the GPU for the released model), "
                        "computed in the dtype above, each layer upcast when it runs; outputs change slightly. "
                        "For 8-12 GB cards (see the README's memory tiers).",
                    },
                ),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model, text_encoder=services.FROM_MODEL, vae=services.FROM_MODEL):
        """Checked before the prompt is queued, so an API client gets the message in its 400 reply."""
        if services.resolve_model(model) is None or services.pickle_message("model", model, services.FOLDER):
            return services.model_missing_message(model)
        try:
            cls._paths(model, text_encoder, vae)
        except InputError as e:
            return str(e)
        return True

    @classmethod
    def IS_CHANGED(
        cls, model, text_encoder=services.FROM_MODEL, vae=services.FROM_MODEL, dtype="auto", weight_dtype="default", **_
    ):
        paths = cls._paths(model, text_encoder, vae, strict=False)
        return "|".join(services.file_signature(p) for p in paths) + "|" + dtype + "|" + weight_dtype

    @staticmethod
    def _paths(model, text_encoder, vae, strict=True):
        model_path = services.resolve_model(model)
        if model_path is None and strict:
            raise InputError("model", services.model_missing_message(model)[len("model: ") :])
        if strict and services.pickle_message("model", model, services.FOLDER):
            raise InputError("model", services.pickle_message("model", model, services.FOLDER)[len("model: ") :])
        te_path = None
        if text_encoder != services.FROM_MODEL:
            refused = services.pickle_message("text_encoder", text_encoder, "text_encoders")
            if refused and strict:
                raise InputError("text_encoder", refused[len("text_encoder: ") :])
            te_path = None if refused else services.resolve_file(services.text_encoder_folders(), text_encoder)
            if te_path is None and strict:
                raise InputError(
                    "text_encoder",
                    f"{text_encoder!r} is not in models/text_encoders or models/clip; "
                    "put the T5-XXL file you use for SD3/Flux there (t5xxl_fp16.safetensors or "
                    "t5xxl_fp8_e4m3fn.safetensors), or pick '(from model)'",
                )
        vae_path = None
        if vae != services.FROM_MODEL:
            refused = services.pickle_message("vae", vae, "vae")
            if refused and strict:
                raise InputError("vae", refused[len("vae: ") :])
            vae_path = None if refused else services.resolve_file(["vae"], vae)
            if vae_path is None and strict:
                raise InputError(
                    "vae",
                    f"{vae!r} is not in models/vae; download vae/diffusion_pytorch_model."
                    "safetensors of glimmer16/UniAlignment (SD3's VAE; any SD3 VAE file works) and save "
                    f"it as models/vae/{vae}, or pick '(from model)'",
                )
        return model_path, te_path, vae_path

    def load(self, model, text_encoder, vae, dtype, weight_dtype="default"):
        model_path, te_path, vae_path = self._paths(model, text_encoder, vae)
        torch_dtype = services.choose_dtype(dtype, services.mm.get_torch_device())
        if weight_dtype not in services.WEIGHT_DTYPES:
            raise InputError("weight_dtype", f"{weight_dtype!r} is not one of {services.WEIGHT_DTYPE_CHOICES}")
        stored = services.WEIGHT_DTYPES[weight_dtype]
        if weight_dtype != "default" and stored is None:
            raise InputError(
                "weight_dtype",
                f"{weight_dtype} needs PyTorch 2.1 or newer (this one has no fp8 "
                f"dtypes, {services.torch.__version__}); pick 'default'",
            )
        try:
            handle = services.load_handle(model, model_path, te_path, vae_path, torch_dtype, stored)
        except CheckpointError as e:
            raise _loader_error(e, model, text_encoder, vae, te_path, vae_path) from None
        return (handle,)


def _loader_error(e, model, text_encoder, vae, te_path, vae_path) -> InputError:
    """Name the input whose file is wrong: by the error's file, or the component it names (none found, or a
    text encoder that does not fit the transformer)."""
    shown = services.client_path(e)  # the file relative to its models folder, never the server's path
    if (te_path and e.path == te_path) or e.component == "text_encoder":
        return InputError("text_encoder", f"{text_encoder!r} cannot be used with model {model!r}: {shown}")
    if (vae_path and e.path == vae_path) or e.component == "vae":
        return InputError("vae", f"{vae!r} cannot be used with model {model!r}: {shown}")
    return InputError("model", f"{model!r} is not a usable UniAlignment model: {shown}")


class UniAlignLoRA:
    DESCRIPTION = (
        "Applies a LoRA to a UniAlignment model: our trainer's output, or any diffusers-format SD3 LoRA "
        "(transformer.*.lora_A/lora_B, alpha keys honoured) whose layers exist in UniAlignment. The base "
        "model is not changed: removing this node gives the base outputs exactly. Chain nodes to stack LoRAs."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("UNIALIGN_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the LoRA applied (the input model stays as it was).",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("UNIALIGN_MODEL", {"tooltip": "The model from UniAlign Loader (or another LoRA node)."}),
                "lora_name": (services.list_files("loras"), {"tooltip": "A LoRA .safetensors file in models/loras."}),
                "strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -4.0,
                        "max": 4.0,
                        "step": 0.05,
                        "tooltip": "How strongly the LoRA applies: 1.0 as trained, 0 = off, 0.5-1.0 to tone it "
                        "down; negative values invert it.",
                    },
                ),
            }
        }

    @classmethod
    def IS_CHANGED(cls, lora_name="", strength=1.0, **_):
        return services.file_signature(services.resolve_file(["loras"], lora_name)) + f"|{strength}"

    def apply(self, model, lora_name, strength):
        path = folder_paths.get_full_path("loras", lora_name)
        if not path:
            raise InputError("lora_name", f"{lora_name!r} is not in models/loras")
        return (services.with_lora(model, lora_name, path, strength),)
