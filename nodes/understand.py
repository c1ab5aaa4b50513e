"""UniAlignUnderstand: captions and visual question answering by masked text diffusion."""

from .. import unialign_core as core
from . import services
from .image_types import InputError, image_to_core

SAMPLERS = ["confidence", "ddpm_cache"]


class UniAlignUnderstand:
    DESCRIPTION = ("Captions an image, or answers a question about it, with UniAlignment's text diffusion. "
                   "Leave the question empty for a caption. A batch of images gives one text per image; the "
                   "text is shown on the node and is also a STRING output (e.g. into a prompt).")
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
                "model": ("UNIALIGN_MODEL", {"tooltip": "The model from UniAlign Loader (optionally through "
                                                        "UniAlign LoRA)."}),
                "image": ("IMAGE", {"tooltip": "The image(s) to describe, any size: larger images are scaled "
                                               "down to about 512x512 (the trained size), odd sizes rounded."}),
                "sampler": (SAMPLERS, {"default": "confidence",
                                       "tooltip": "confidence: fills the most certain tokens first and stops at "
                                       "the end of the text (fast, good default). ddpm_cache: the published "
                                       "MDLM sampler (always runs all steps)."}),
                "length": ("INT", {"default": 128, "min": 8, "max": 512, "step": 8,
                                   "tooltip": "Tokens to generate, the question included. 128 fits most captions "
                                   "and answers; the published caption length is 256."}),
                "steps": ("INT", {"default": 32, "min": 1, "max": 1024,
                                  "tooltip": "Denoising steps (published: 32). Fewer is faster; more than the "
                                  "length does not help."}),
                # Not named "seed": the 2024 frontend would add a randomize-after-each-run control to it.
                "sampler_seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                         "tooltip": "Seed for the sampler's randomness (ddpm_cache) and the image "
                                         "encoding. Keep it fixed for repeatable text; 0 is fine."}),
            },
            "optional": {
                "question": ("STRING", {"default": "", "multiline": True,
                                        "tooltip": "A question about the image, e.g. 'What colour is the car?'. "
                                        "Empty = write a caption."}),
                "short_answer": ("BOOLEAN", {"default": False,
                                             "tooltip": "Ask for a one-word or one-phrase answer (the hint the "
                                             "model was fine-tuned with). Only used with a question."}),
            },
        }

    def understand(self, model, image, sampler, length, steps, sampler_seed, question="", short_answer=False):
        if sampler not in SAMPLERS:
            raise InputError("sampler", f"{sampler!r} is not one of {SAMPLERS}")
        pixels = image_to_core(image, "image")  # any size: the core rounds it and scales large images to ~512
        weights = model.activate()
        progress = services.Progress(model, previews=False)
        common = dict(length=length, steps=steps, sampler=sampler, seed=sampler_seed, callback=progress,
                      cancel=services.cancel)
        question = (question or "").strip()
        try:
            if question:
                texts = core.answer(weights, pixels, question, short=bool(short_answer), **common)
            else:
                texts = core.caption(weights, pixels, **common)
        except ValueError as e:
            if "raise length" in str(e):
                raise InputError("length", str(e)) from None
            raise
        return {"ui": {"text": list(texts)}, "result": (list(texts),)}
