"""UniAlignLoader and UniAlignLoRA."""

import torch

import folder_paths

from ..unialign_core import CheckpointError
from . import model_cache, model_files
from .image_types import InputError
from .lora_patches import with_lora
from .model_files import FROM_MODEL

CATEGORY = "UniAlignment"


class _ModelOutput:
    """A node whose output is a UNIALIGN_MODEL."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("UNIALIGN_MODEL",)
    RETURN_NAMES = ("model",)


class UniAlignLoader(_ModelOutput):
    DESCRIPTION = (
        "Loads a UniAlignment (or DualDiffusion) model: the transformer, the T5 text encoder, the SD3 VAE and "
        "the tokenizer. ComfyUI's model management moves it to the GPU when a UniAlign node runs and "
        "offloads it when another workflow needs the memory. A loaded model is reused while the files "
        "and the dtype stay the same, so changing a prompt never reloads it."
    )
    OUTPUT_TOOLTIPS = ("The loaded model, for the UniAlign LoRA and mode nodes.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (
                    model_files.list_models(),
                    {
                        "tooltip": "A file or folder in models/unialignment: our single .safetensors file (made with "
                        "`python -m unialign_core.convert` or by the trainer), or the upstream folder of "
                        "glimmer16/UniAlignment or a DualDiffusion model, as downloaded."
                    },
                ),
                "text_encoder": (
                    [FROM_MODEL] + model_files.list_text_encoders(),
                    {
                        "default": FROM_MODEL,
                        "tooltip": "The T5-XXL encoder. '(from model)' uses the one bundled in the single file or "
                        "the model folder's text_encoder/. Pick your existing t5xxl_fp16 (or fp8) file from "
                        "models/text_encoders to share it with SD3/Flux workflows.",
                    },
                ),
                "vae": (
                    [FROM_MODEL] + model_files.list_files("vae"),
                    {
                        "default": FROM_MODEL,
                        "tooltip": "The SD3 VAE. '(from model)' uses the one bundled in the single file or the "
                        "model folder's vae/. Otherwise pick an SD3 VAE file from models/vae.",
                    },
                ),
                "dtype": (
                    model_cache.DTYPE_CHOICES,
                    {
                        "default": "auto",
                        "tooltip": "Weight precision. auto picks what ComfyUI picks for SD3 on this device (bf16 "
                        "on recent GPUs, fp32 on the CPU). fp16 keeps the VAE in fp32. fp32 needs ~2x the memory.",
                    },
                ),
                "weight_dtype": (
                    model_cache.WEIGHT_DTYPE_CHOICES,
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
    def VALIDATE_INPUTS(cls, model):
        """The model file, checked before the prompt is queued (an API client gets the message in its 400 reply).

        It takes `model` alone: ComfyUI attaches the text returned here to every input this method takes, and
        checks each input it does not take against its list itself, so a missing text_encoder or vae file is
        named once, on its own input, and the model's problem only on `model`."""
        return model_files.model_problem(model) or True

    @classmethod
    def IS_CHANGED(cls, model, text_encoder=FROM_MODEL, vae=FROM_MODEL, dtype="auto", weight_dtype="default", **_):
        paths = cls._paths(model, text_encoder, vae, strict=False)
        return "|".join(model_files.file_signature(p) for p in paths) + "|" + dtype + "|" + weight_dtype

    @staticmethod
    def _paths(model, text_encoder, vae, strict=True):
        """The files the three inputs name (None: from the model). strict: InputError naming the first input whose
        file is refused or gone (after validation: e.g. deleted since, or `load` called outside ComfyUI)."""
        problems = {"model": model_files.model_problem(model)}
        paths = [None if problems["model"] else model_files.resolve_model(model)]
        for name, value, folder, folders in (
            ("text_encoder", text_encoder, "text_encoders", model_files.text_encoder_folders()),
            ("vae", vae, "vae", ["vae"]),
        ):
            refused = None if value == FROM_MODEL else model_files.pickle_problem(value, folder)
            path = None if value == FROM_MODEL or refused else model_files.resolve_file(folders, value)
            if value != FROM_MODEL and path is None:
                problems[name] = refused or _missing_component(name, value)
            paths.append(path)
        for name, problem in problems.items():
            if problem and strict:
                raise InputError(name, problem)
        return tuple(paths)

    def load(self, model, text_encoder, vae, dtype, weight_dtype="default"):
        model_path, te_path, vae_path = self._paths(model, text_encoder, vae)
        torch_dtype = model_cache.choose_dtype(dtype)
        if weight_dtype not in model_cache.WEIGHT_DTYPES:
            raise InputError("weight_dtype", f"{weight_dtype!r} is not one of {model_cache.WEIGHT_DTYPE_CHOICES}")
        stored = model_cache.WEIGHT_DTYPES[weight_dtype]
        if weight_dtype != "default" and stored is None:
            raise InputError(
                "weight_dtype",
                f"{weight_dtype} needs PyTorch 2.1 or newer (this one has no fp8 "
                f"dtypes, {torch.__version__}); pick 'default'",
            )
        try:
            handle = model_cache.load_handle(model, model_path, te_path, vae_path, torch_dtype, stored)
        except CheckpointError as e:
            raise _loader_error(e, model, text_encoder, vae, te_path, vae_path) from None
        return (handle,)


def _missing_component(name, value) -> str:
    if name == "text_encoder":
        return (
            f"{value!r} is not in models/text_encoders or models/clip; put the T5-XXL file you use for SD3/Flux "
            "there (t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors), or pick '(from model)'"
        )
    return (
        f"{value!r} is not in models/vae; download vae/diffusion_pytorch_model.safetensors of glimmer16/UniAlignment "
        f"(SD3's VAE; any SD3 VAE file works) and save it as models/vae/{value}, or pick '(from model)'"
    )


def _loader_error(e, model, text_encoder, vae, te_path, vae_path) -> InputError:
    """Name the input whose file is wrong: by the error's file, or the component it names (none found, or a
    text encoder that does not fit the transformer)."""
    shown = model_files.client_path(e)  # the file relative to its models folder, never the server's path
    if (te_path and e.path == te_path) or e.component == "text_encoder":
        return InputError("text_encoder", f"{text_encoder!r} cannot be used with model {model!r}: {shown}")
    if (vae_path and e.path == vae_path) or e.component == "vae":
        return InputError("vae", f"{vae!r} cannot be used with model {model!r}: {shown}")
    return InputError("model", f"{model!r} is not a usable UniAlignment model: {shown}")


class UniAlignLoRA(_ModelOutput):
    DESCRIPTION = (
        "Applies a LoRA to a UniAlignment model: our trainer's output, or any diffusers-format SD3 LoRA "
        "(transformer.*.lora_A/lora_B, alpha keys honoured) whose layers exist in UniAlignment. The base "
        "model is not changed: removing this node gives the base outputs exactly. Chain nodes to stack LoRAs."
    )
    OUTPUT_TOOLTIPS = ("The model with the LoRA applied (the input model stays as it was).",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("UNIALIGN_MODEL", {"tooltip": "The model from UniAlign Loader (or another LoRA node)."}),
                "lora_name": (
                    model_files.list_files("loras"),
                    {"tooltip": "A LoRA .safetensors file in models/loras."},
                ),
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
        return model_files.file_signature(model_files.resolve_file(["loras"], lora_name)) + f"|{strength}"

    def apply(self, model, lora_name, strength):
        path = folder_paths.get_full_path("loras", lora_name)
        if not path:
            raise InputError("lora_name", f"{lora_name!r} is not in models/loras")
        return (with_lora(model, lora_name, path, strength),)
