"""The demo model shipped in the repository: a small UniAlignment of the shapes world, trained once by our own
trainer (``python -m train.shapes base``), with its T5, VAE and tokenizer bundled in one file. The ComfyUI Loader
lists it without copying files; README command 1 fine-tunes it."""

import os

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DIR = os.path.join(PACK_ROOT, "demo")
DEMO_MODEL = os.path.join(DEMO_DIR, "shapes-demo.safetensors")
DEMO_CARD = os.path.join(DEMO_DIR, "shapes-demo.json")  # how it was made, its sha256, sampler settings, figures
DEMO_TEACHER = os.path.join(DEMO_DIR, "shapes-teacher")  # the teacher of L_align, for fine-tuning it
# the name the Loader shows -> the file
BUNDLED_MODELS = {"shapes-demo (bundled)": DEMO_MODEL}


def bundled_models() -> dict:
    """The bundled models that are present in this copy of the pack (name -> path)."""
    return {name: path for name, path in BUNDLED_MODELS.items() if os.path.isfile(path)}
