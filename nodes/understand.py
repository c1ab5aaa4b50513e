"""UniAlignUnderstand: captions and visual question answering by masked text diffusion."""

from .. import unialign_core as core
from .image_types import InputError, core_inputs, image_to_core
from .progress import Progress, cancel

SAMPLERS = ["fast", "confidence", "ddpm_cache"]
# "fast" = the confidence sampler with the image-stream cache refreshed every 8 steps; no threshold commits, which
# lost most parseable captions on the trained shapes model (README, "Understanding samplers", 200 records a setting)
FAST = dict(sampler="confidence", refresh=8)
RESIZE = list(core.modes.RESIZE_POLICIES)  # trained, crop, as_is


class UniAlignUnderstand:
    DESCRIPTION = (
        "Captions an image, or answers a question about it, with UniAlignment's text diffusion. "
        "Leave the question empty for a caption. A batch of images gives one text per image; the "
        "text is shown on the node and is also a STRING output (e.g. into a prompt)."
    )
    CATEGORY = "UniAlignment"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("text",)
    OUTPUT_IS_LIST = (True,)
    OUTPUT_TOOLTIPS = ("One caption or answer per input image (a list: nodes after this run once per text).",)
    OUTPUT_NODE = True
    FUNCTION = "understand"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (
                    "UNIALIGN_MODEL",
                    {"tooltip": "The model from UniAlign Loader (optionally through UniAlign LoRA)."},
                ),
                "image": (
                    "IMAGE",
                    {
                        "tooltip": "The image(s) to describe, any size: by default scaled up or "
                        "down to the size the model was trained at (see resize)."
                    },
                ),
                "sampler": (
                    SAMPLERS,
                    {
                        "default": "fast",
                        "tooltip": "fast (default): the confidence sampler reusing the image's "
                        "attention keys and values for 8 steps at a time (about 2x faster than "
                        "confidence, an approximation). confidence: fills the most certain "
                        "tokens first and stops at the end of the text (exact, no reuse). "
                        "ddpm_cache: the published MDLM sampler (always runs all steps).",
                    },
                ),
                "length": (
                    "INT",
                    {
                        "default": 128,
                        "min": 8,
                        "max": 512,
                        "step": 8,
                        "tooltip": "Tokens to generate, the question included. 128 fits most captions "
                        "and answers; the published caption length is 256.",
                    },
                ),
                "steps": (
                    "INT",
                    {
                        "default": 32,
                        "min": 1,
                        "max": 1024,
                        "tooltip": "Denoising steps (published: 32). Fewer is faster; more than the "
                        "length does not help.",
                    },
                ),
                # Not named "seed": the 2024 frontend would add a randomize-after-each-run control to it.
                "sampler_seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 0xFFFFFFFFFFFFFFFF,
                        "tooltip": "Seed for the sampler's randomness (ddpm_cache) and the image "
                        "encoding. Keep it fixed for repeatable text; 0 is fine.",
                    },
                ),
            },
            "optional": {
                "question": (
                    "STRING",
                    {
                        "default": "",
                        "multiline": True,
                        "tooltip": "A question about the image, e.g. 'What colour is the car?'. "
                        "Empty = write a caption.",
                    },
                ),
                "short_answer": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Ask for a one-word or one-phrase answer (the hint the "
                        "model was fine-tuned with). Only used with a question.",
                    },
                ),
                "resize": (
                    RESIZE,
                    {
                        "default": "trained",
                        "tooltip": "How the image is sized for reading. trained: scaled up or down to "
                        "about the model's training size in area (512x512 for the released model; 32x32 "
                        "for the shapes model), aspect kept, sides multiples of 16. crop: the official "
                        "pipeline's resize of the shorter side and centre crop to that square. as_is: "
                        "its own size (odd sides rounded), at most the model's position table.",
                    },
                ),
            },
        }

    def understand(
        self, model, image, sampler, length, steps, sampler_seed, question="", short_answer=False, resize="trained"
    ):
        if sampler not in SAMPLERS:
            raise InputError("sampler", f"{sampler!r} is not one of {SAMPLERS}")
        names = {
            "image": "image",
            "resize": "resize",
            "answer_tokens": "length",
            "steps": "steps",
            "question": "question",
        }
        pixels = image_to_core(image, "image")  # any size: sized by the core's resize policy
        with core_inputs(names):  # the core checks resize; its sizes are multiples of the model's
            pixels = core.modes.understanding_input(model.model, pixels, resize)
        weights = model.activate()
        progress = Progress(model, previews=False)
        chosen = FAST if sampler == "fast" else dict(sampler=sampler)
        common = dict(answer_tokens=length, steps=steps, seed=sampler_seed, callback=progress, cancel=cancel, **chosen)
        common["resize"] = "as_is"  # already sized by the policy above
        question = (question or "").strip()
        with core_inputs(names):  # e.g. length too short for the question, image past the model's limit
            if question:
                texts = core.answer(weights, pixels, question, short=bool(short_answer), **common)
            else:
                texts = core.caption(weights, pixels, **common)
        return {"ui": {"text": list(texts)}, "result": (list(texts),)}
