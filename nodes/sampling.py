"""The image modes: UniAlignTextToImage, UniAlignEdit, UniAlignPerceive, UniAlignCompose."""

from .. import unialign_core as core
from ..unialign_core.modes import max_image_side, prompt_notes
from . import services
from .image_types import (
    InputError,
    check_multiple,
    check_side,
    check_text,
    image_from_core,
    image_to_core,
    latent_to_comfy,
)

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
    about one of them is raised naming the node input (`services.core_inputs`); guidance and each text are named
    as they are."""
    names = dict({"guidance": "guidance", **{name: name for name, _ in texts}}, **(names or {}))
    with services.core_inputs(names):
        warnings = [note for name, text in texts for note in prompt_notes(handle.model, text, name)]
    for warning in warnings:
        services.log.warning("[UniAlign] %s", warning)
    model = handle.activate(text_encoder_each_step=False)  # T5 only around the prompt encoding
    progress = services.Progress(handle)
    with services.core_inputs(names):
        result = mode(model, *args, callback=progress, cancel=services.cancel, **kwargs)
    device = services.output_device()
    images = image_from_core(result.images, device), latent_to_comfy(result.latents, model, device)
    return {"ui": {"text": warnings}, "result": images}


def check_fits(handle, name, width, height=None):
    """A side (or an image's sides) within the loaded model's position table, checked before any work."""
    limit = max_image_side(handle.model)
    sides = (width,) if height is None else (width, height)
    if max(sides) <= limit:
        return
    what = f"{width}" if height is None else f"size {width}x{height}"
    raise InputError(
        name,
        f"{what} is larger than this model allows: its position table covers at most "
        f"{limit}x{limit} pixels; use at most {limit} a side (scale the image down first)",
    )


def _source(handle, image, name):
    """The IMAGE as core pixels; its sides are checked here with a ComfyUI hint, the model's size limit by the
    core before the VAE runs."""
    pixels = image_to_core(image, name)
    check_multiple(name, pixels.shape[-1], pixels.shape[-2], handle.pixel_multiple)
    return pixels


def _check_sides(handle, width, height):
    for name, value in (("width", width), ("height", height)):
        check_side(name, value, handle.pixel_multiple)
        check_fits(handle, name, value)


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
        check_text("prompt", prompt, "describe the image you want")
        _check_sides(model, width, height)
        return _run(
            model,
            core.text_to_image,
            prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            steps=steps,
            guidance=guidance,
            seed=seed,
            num_images=batch_size,
            texts=(("prompt", prompt), ("negative_prompt", negative_prompt)),
            names={"prompt": "prompt", "steps": "steps"},
        )


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
        check_text("instruction", instruction, "say what to change, e.g. 'make it winter'")
        pixels = _source(model, image, "image")
        return _run(
            model,
            core.edit,
            pixels,
            instruction,
            negative_prompt=negative_prompt,
            steps=steps,
            guidance=guidance,
            image_guidance=None if image_guidance == 1.0 else image_guidance,
            seed=seed,
            num_images=batch_size,
            texts=(("instruction", instruction), ("negative_prompt", negative_prompt)),
            names={
                "image": "image",
                "instruction": "instruction",
                "steps": "steps",
                "image_guidance": "image_guidance",
            },
        )


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
        if task not in self.TASKS:
            raise InputError("task", f"{task!r} is not one of {self.TASKS}")
        custom = None
        if task == "custom":
            custom = check_text("instruction", instruction, "task 'custom' needs your own instruction")
        pixels = _source(model, image, "image")
        return _run(
            model,
            core.perceive,
            pixels,
            task if custom is None else "custom",
            instruction=custom,
            steps=steps,
            guidance=guidance,
            seed=seed,
            texts=(("instruction", custom),) if custom else (),
            names={"image": "image", "instruction": "instruction", "task": "task", "steps": "steps"},
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
        check_text("prompt", prompt, "describe what to make from the references")
        _check_sides(model, width, height)
        references, names = [], {"prompt": "prompt", "steps": "steps"}
        for name, image in zip(self.REFERENCES, (reference_1, reference_2, reference_3)):
            if image is None:
                continue
            references.append(_source(model, image, name))
            names[f"reference {len(references)}"] = name  # the core counts the references given
        return _run(
            model,
            core.compose,
            references,
            prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            steps=steps,
            guidance=guidance,
            seed=seed,
            num_images=batch_size,
            texts=(("prompt", prompt), ("negative_prompt", negative_prompt)),
            names=names,
        )
