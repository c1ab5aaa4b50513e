"""The image modes: UniAlignTextToImage, UniAlignEdit, UniAlignPerceive, UniAlignCompose.

The inputs are checked by unialign_core (sizes against the loaded model, empty prompts, finite numbers) before any
VAE or T5 work; its InputError is raised naming the node's input (`image_types.core_inputs`).
"""

import logging

from .. import unialign_core as core
from ..unialign_core.modes import prompt_notes
from .image_types import core_inputs, image_from_core, image_to_core, latent_to_comfy
from .model_cache import output_device
from .progress import Progress, cancel

log = logging.getLogger("UniAlignment")
CATEGORY = "UniAlignment"
MAX_SIDE = 3072  # the released model's position table: 192 patches x 16 px; smaller models are checked on run
RETURN_TYPES = ("IMAGE", "LATENT")
RETURN_NAMES = ("images", "latent")
OUTPUT_TOOLTIPS = (
    "The generated images (a batch).",
    "The same result as SD3-format latents, for ComfyUI's VAE Decode with an SD3 VAE or other latent nodes.",
)


def model_input():
    return ("UNIALIGN_MODEL", {"tooltip": "The model from UniAlign Loader (optionally through UniAlign LoRA)."})


def text_input(tooltip, default=""):
    return ("STRING", {"default": default, "multiline": True, "tooltip": tooltip})


def negative_input():
    return text_input(
        "What to steer away from (used by classifier-free guidance). Empty is the published default; "
        "e.g. 'blurry, low quality, distorted'."
    )


def side_input(name):
    return (
        "INT",
        {
            "default": 512,
            "min": 16,
            "max": MAX_SIDE,
            "step": 16,
            "tooltip": f"Output {name} in pixels, a multiple of 16, at most {MAX_SIDE} (the released "
            "model's position table; a smaller model's own limit is checked when it runs). The model is "
            "trained at 512x512; 512-768 works best.",
        },
    )


def steps_input(default, published):
    return (
        "INT",
        {
            "default": default,
            "min": 1,
            "max": 10000,
            "tooltip": f"Denoising steps. {published} More steps are slower; below ~20 loses detail.",
        },
    )


def guidance_input(default=7.0):
    return (
        "FLOAT",
        {
            "default": default,
            "min": 1.0,
            "max": 30.0,
            "step": 0.1,
            "round": 0.01,
            "tooltip": "Classifier-free guidance on the text. 5-9 is good (published: 7). 1.0 (the "
            "minimum) turns CFG off: twice as fast, weaker prompt following; values below 1 would also "
            "mean off and give the same image, so they are not offered.",
        },
    )


def seed_input():
    return (
        "INT",
        {
            "default": 0,
            "min": 0,
            "max": 0xFFFFFFFFFFFFFFFF,
            "control_after_generate": True,
            "tooltip": "Noise seed. The same seed and settings give the same image.",
        },
    )


def batch_input(what):
    return ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": f"How many images to make {what} (1-4 is typical)."})


def _run(handle, mode, *args, texts=(), names=None, **kwargs):
    """Load the weights through ComfyUI, run a unialign_core mode with progress/preview/cancel, convert.

    `texts` are (input name, text) pairs fed to T5: the core's notes on them (an end cut at the model's token
    limit, text T5 cannot read) are the node's UI output ("text", shown on the node by web/show_text.js, and in
    /history for API clients). `names` maps the mode's argument names to the node's inputs: the core's InputError
    about one of them is raised naming the node input; guidance and each text are named as they are."""
    names = dict({"guidance": "guidance", **{name: name for name, _ in texts}}, **(names or {}))
    with core_inputs(names):
        warnings = [note for name, text in texts for note in prompt_notes(handle.model, text, name)]
    for warning in warnings:
        log.warning("[UniAlign] %s", warning)
    model = handle.activate(text_encoder_each_step=False)  # T5 only around the prompt encoding
    with core_inputs(names):
        result = mode(model, *args, callback=Progress(handle), cancel=cancel, **kwargs)
    device = output_device()
    images = image_from_core(result.images, device), latent_to_comfy(result.latents, model, device)
    return {"ui": {"text": warnings}, "result": images}


def _generate(handle, mode, args, prompt, negative_prompt, size, steps, guidance, seed, batch_size, names=None):
    """text_to_image and compose: the mode's positional `args` (the prompt; or the references, the prompt) and
    the settings they share. The core checks width and height together: its error names "width/height"."""
    return _run(
        handle,
        mode,
        *args,
        negative_prompt=negative_prompt,
        width=size[0],
        height=size[1],
        steps=steps,
        guidance=guidance,
        seed=seed,
        num_images=batch_size,
        texts=(("prompt", prompt), ("negative_prompt", negative_prompt)),
        names={"prompt": "prompt", "steps": "steps", "width/height": "width/height", **(names or {})},
    )


def _from_image(handle, mode, image, args, steps, guidance, seed, texts, names, **kwargs):
    """edit and perceive: the source IMAGE input (checked by the core as "image"), then the mode's `args`."""
    names = {"image": "image", "instruction": "instruction", "steps": "steps", **names}
    pixels = image_to_core(image, "image")
    return _run(
        handle, mode, pixels, *args, steps=steps, guidance=guidance, seed=seed, texts=texts, names=names, **kwargs
    )


class UniAlignTextToImage:
    DESCRIPTION = (
        "Text-to-image with UniAlignment: flow-matching sampling with classifier-free guidance. "
        "Shows progress and latent previews; Cancel stops within one step."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = RETURN_TYPES
    RETURN_NAMES = RETURN_NAMES
    OUTPUT_TOOLTIPS = OUTPUT_TOOLTIPS
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": model_input(),
                "prompt": text_input(
                    "What to draw. A sentence or two in plain English works best (T5 reads up to 256 tokens)."
                ),
                "negative_prompt": negative_input(),
                "width": side_input("width"),
                "height": side_input("height"),
                "steps": steps_input(28, "28 is the published default (50 in the UniAlignment demo)."),
                "guidance": guidance_input(),
                "seed": seed_input(),
                "batch_size": batch_input("for the prompt"),
            }
        }

    def generate(self, model, prompt, negative_prompt, width, height, steps, guidance, seed, batch_size):
        return _generate(
            model, core.text_to_image, (prompt,), prompt, negative_prompt, (width, height), steps, guidance, seed,
            batch_size,
        )  # fmt: skip


class UniAlignEdit:
    DESCRIPTION = (
        "Instruction-based image editing: the source image is kept as condition tokens and the "
        "instruction says what to change. The output has the source's size (sides a multiple of 16; "
        "512x512 works best). Each image of a batch is edited."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = RETURN_TYPES
    RETURN_NAMES = RETURN_NAMES
    OUTPUT_TOOLTIPS = OUTPUT_TOOLTIPS
    FUNCTION = "edit"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": model_input(),
                "image": (
                    "IMAGE",
                    {
                        "tooltip": "The image(s) to edit. Sides must be multiples of 16 (scale it to "
                        "512x512 first for the best results); alpha is composited on white."
                    },
                ),
                "instruction": text_input(
                    "What to change, as an instruction, e.g. 'make it winter' or 'replace the cat with a dog'."
                ),
                "negative_prompt": negative_input(),
                "steps": steps_input(50, "50 is the published default."),
                "guidance": guidance_input(),
                "image_guidance": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 10.0,
                        "step": 0.05,
                        "round": 0.01,
                        "tooltip": "Extra guidance towards the source image. 1.0 = off (the "
                        "published two-way guidance); 1.2-1.8 keeps more of the source "
                        "(one more model call per step).",
                    },
                ),
                "seed": seed_input(),
                "batch_size": batch_input("per source image"),
            }
        }

    def edit(self, model, image, instruction, negative_prompt, steps, guidance, image_guidance, seed, batch_size):
        texts = (("instruction", instruction), ("negative_prompt", negative_prompt))
        return _from_image(
            model, core.edit, image, (instruction,), steps, guidance, seed, texts, {"image_guidance": "image_guidance"},
            negative_prompt=negative_prompt, image_guidance=None if image_guidance == 1.0 else image_guidance,
            num_images=batch_size,
        )  # fmt: skip


class UniAlignPerceive:
    DESCRIPTION = (
        "Perception maps (depth, canny edges, human pose) from an image: the edit path with the "
        "published instruction, or your own with task 'custom'. The map has the source's size."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = RETURN_TYPES
    RETURN_NAMES = ("maps", "latent")
    OUTPUT_TOOLTIPS = ("The perception maps (a batch).", OUTPUT_TOOLTIPS[1])
    FUNCTION = "perceive"
    TASKS = sorted(core.PERCEPTION_PRESETS) + ["custom"]

    @classmethod
    def INPUT_TYPES(cls):
        presets = "; ".join(f"{k}: '{v}'" for k, v in sorted(core.PERCEPTION_PRESETS.items()))
        return {
            "required": {
                "model": model_input(),
                "image": (
                    "IMAGE",
                    {"tooltip": "The image(s) to analyse. Sides must be multiples of 16 (512x512 works best)."},
                ),
                "task": (
                    cls.TASKS,
                    {
                        "default": "depth",
                        "tooltip": f"Which map to make. The instructions used: {presets}. 'custom' "
                        "uses the instruction below.",
                    },
                ),
                "instruction": text_input(
                    "Only for task 'custom': your own instruction, e.g. 'Provide a detailed "
                    "segmentation map of the entire scene.' Ignored for the presets."
                ),
                "steps": steps_input(50, "50 is the published default."),
                "guidance": guidance_input(),
                "seed": seed_input(),
            }
        }

    def perceive(self, model, image, task, instruction, steps, guidance, seed):
        custom = instruction if task == "custom" else None  # the core refuses an empty one, naming instruction
        texts = (("instruction", custom),) if custom is not None else ()
        return _from_image(
            model, core.perceive, image, (task,), steps, guidance, seed, texts, {"task": "task"}, instruction=custom
        )


class UniAlignCompose:
    DESCRIPTION = (
        "Personalise / compose: generate from a prompt and 1-3 reference images (a subject, a style, "
        "objects to combine). Refer to them in the prompt, e.g. 'the dog from the first image on a "
        "beach'. References may have any size that is a multiple of 16."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = RETURN_TYPES
    RETURN_NAMES = RETURN_NAMES
    OUTPUT_TOOLTIPS = OUTPUT_TOOLTIPS
    FUNCTION = "compose"
    REFERENCES = ("reference_1", "reference_2", "reference_3")

    @classmethod
    def INPUT_TYPES(cls):
        ref = "A reference image (one image, not a batch); sides a multiple of 16, 512x512 works best."
        return {
            "required": {
                "model": model_input(),
                "reference_1": ("IMAGE", {"tooltip": ref}),
                "prompt": text_input(
                    "What to make from the references, e.g. 'the toy from the first image on a "
                    "wooden table, soft light'."
                ),
                "negative_prompt": negative_input(),
                "width": side_input("width"),
                "height": side_input("height"),
                "steps": steps_input(50, "50 is the published default."),
                "guidance": guidance_input(),
                "seed": seed_input(),
                "batch_size": batch_input("for the prompt"),
            },
            "optional": {
                "reference_2": ("IMAGE", {"tooltip": "Optional second reference. " + ref}),
                "reference_3": ("IMAGE", {"tooltip": "Optional third reference. " + ref}),
            },
        }

    def compose(
        self,
        model,
        reference_1,
        prompt,
        negative_prompt,
        width,
        height,
        steps,
        guidance,
        seed,
        batch_size,
        reference_2=None,
        reference_3=None,
    ):
        references, names = [], {}
        for name, image in zip(self.REFERENCES, (reference_1, reference_2, reference_3)):
            if image is not None:
                references.append(image_to_core(image, name))
                names[f"reference {len(references)}"] = name  # the core counts the references given
        return _generate(
            model, core.compose, (references, prompt), prompt, negative_prompt, (width, height), steps, guidance,
            seed, batch_size, names,
        )  # fmt: skip
