"""Helpers for the node tests and `tools/render_images.py`: the tiny models a server needs,
input images, the tiny-model settings for the example workflows, and running a prompt.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from tiny_models import GOLDEN, write_single_file
from tools.make_api import WORKFLOWS as WORKFLOW_TITLES  # short name -> UI file name

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
TINY_MODEL = "tiny_unialign.safetensors"  # our single file with T5, VAE and tokenizer bundled
TINY_FOLDER = "tiny_upstream"  # the golden checkpoint in the upstream folder layout
WRONG_MODEL = "wrong_arch.safetensors"  # a plain transformer without our metadata
TINY_LORA = "tiny_lora.safetensors"
TINY_MULTIPLE = 4  # the tiny VAE downsamples x2, patch size 2
SIDE = 64  # image sides for the tiny model (its position table allows up to 128)
INPUT_IMAGES = ("example.png", "example_2.png")

# The example workflows by short name (api/<name>.json); tools/make_api.py maps each to its UI file's name.
WORKFLOW_NAMES = tuple(WORKFLOW_TITLES)
# Those built from ComfyUI's own samplers on the native MODEL: they need a ComfyUI with SD3 support (mid 2024 on).
NATIVE_WORKFLOWS = ("native_ksampler", "native_edit_caption_loop")
SD3_LATENT_DIVISOR = 8  # EmptySD3LatentImage's latent side = width // 8; the tiny VAE scales by 2
TINY_VAE_SCALE = 2


def unsupported_reason(api, object_info):
    """Why this ComfyUI server (its /object_info) cannot run the API workflow, or None."""
    missing = sorted({n["class_type"] for n in api.values()} - set(object_info))
    native = any(n["class_type"].startswith("UniAlignNative") for n in api.values())
    if native and "ModelSamplingSD3" not in object_info:
        missing = missing or ["ModelSamplingSD3"]
    if not missing:
        return None
    return (
        f"this ComfyUI lacks {', '.join(missing)}: it predates SD3 support (June 2024), which the native MODEL and "
        "its core nodes need; tests/test_native.py runs this workflow on ComfyUI 0.3.64 (COMFYUI_0364_DIR)"
    )


def make_models_dir(models: Path) -> Path:
    """models/unialignment with the tiny file, the tiny folder and a wrong file; models/loras with a LoRA."""
    unialign = models / "unialignment"
    unialign.mkdir(parents=True, exist_ok=True)
    write_single_file(unialign / TINY_MODEL, bundle=True)
    (unialign / TINY_FOLDER).symlink_to(GOLDEN, target_is_directory=True)
    from safetensors.torch import load_file

    plain = load_file(str(GOLDEN / "transformer" / "diffusion_pytorch_model.safetensors"))
    save_file(plain, str(unialign / WRONG_MODEL))
    (models / "loras").mkdir(parents=True, exist_ok=True)
    write_tiny_lora(models / "loras" / TINY_LORA)
    return models


def write_tiny_lora(path: Path) -> Path:
    """A rank-2 LoRA on the first block's attention, strong enough to change the output visibly."""
    from unialign_core.lora import LoraLayer, save_lora

    g = torch.Generator().manual_seed(3)
    layers = {}
    for module in (
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.to_v",
        "transformer_blocks.1.attn.to_out.0",
    ):
        layers[module] = LoraLayer(torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g), 2.0)
    save_lora(str(path), layers)
    return path


def make_input_images(folder: Path, size=(80, 72)):
    """Two small colourful pictures (deliberately not a multiple of 16: the workflows scale them)."""
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    first = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 90)], -1)
    first[(x - w // 2) ** 2 + (y - h // 2) ** 2 < (h // 4) ** 2] = (230, 40, 40)
    second = np.stack([np.full_like(x, 40), x * 255 // w, 255 - y * 255 // h], -1)
    second[h // 3 : 2 * h // 3, w // 4 : 3 * w // 4] = (250, 220, 30)
    for name, array in zip(INPUT_IMAGES, (first, second)):
        Image.fromarray(array.astype(np.uint8)).save(folder / name)
    return folder


def load_api(name):
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text(encoding="utf-8"))


def tiny_settings(api, steps=4):
    """The example workflow, made to run in seconds on the tiny model: same graph, smaller numbers."""
    api = json.loads(json.dumps(api))
    references = iter(INPUT_IMAGES)
    for node in (api[k] for k in sorted(api, key=lambda k: (len(k), k))):
        inputs = node["inputs"]
        cls = node["class_type"]
        if cls == "UniAlignLoader":
            inputs.update(model=TINY_MODEL, text_encoder="(from model)", vae="(from model)", dtype="auto")
        elif cls == "LoadImage":
            inputs["image"] = next(references, INPUT_IMAGES[0])
        elif cls == "ImageScale":
            inputs.update(width=SIDE, height=SIDE)
        elif cls in ("UniAlignTextToImage", "UniAlignCompose"):
            inputs.update(width=SIDE, height=SIDE, steps=steps)
        elif cls in ("UniAlignEdit", "UniAlignPerceive"):
            inputs.update(steps=steps)
        elif cls == "UniAlignUnderstand":
            inputs.update(length=32, steps=8)
        elif cls == "EmptySD3LatentImage":  # SIDE pixels out of the tiny VAE
            side = SIDE // TINY_VAE_SCALE * SD3_LATENT_DIVISOR
            inputs.update(width=side, height=side)
        elif cls in ("KSampler", "UniAlignNativeSigmas"):
            inputs.update(steps=steps)
    return api


def renumber(api, prefix):
    """The same graph with new node ids (ComfyUI caches by node id in some versions)."""
    ids = {k: f"{prefix}{k}" for k in api}
    out = {}
    for k, node in api.items():
        node = json.loads(json.dumps(node))
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] in ids:
                node["inputs"][name] = [ids[value[0]], value[1]]
        out[ids[k]] = node
    return out


def run(server, api, timeout=120):
    """Queue a prompt, wait, and return its history entry; fail with the messages and log on error."""
    prompt_id = server.queue_prompt(api)
    entry = server.wait(prompt_id, timeout=timeout)
    if entry["status"]["status_str"] != "success":
        raise AssertionError(
            f"prompt failed: {json.dumps(entry['status']['messages'], indent=1)[:4000]}\n{server.log_tail(40)}"
        )
    return entry


def message(entry, kind):
    """The payload of the first status message of this kind (execution_error, execution_interrupted, ...)."""
    for name, payload in entry["status"]["messages"]:
        if name == kind:
            return payload
    return None


def cached_nodes(entry):
    payload = message(entry, "execution_cached")
    return set(payload["nodes"]) if payload else set()


def output_files(server, entry, node_id):
    """Paths of the images a SaveImage node wrote."""
    paths = []
    for image in entry["outputs"].get(node_id, {}).get("images", []):
        assert image["type"] == "output", image
        paths.append(server.base_dir / "output" / image["subfolder"] / image["filename"])
    return paths


def read_pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def save_image_nodes(api):
    return sorted(k for k, n in api.items() if n["class_type"] == "SaveImage")


def understand_nodes(api):
    return sorted(k for k, n in api.items() if n["class_type"] == "UniAlignUnderstand")


def image_source(api, node_id):
    """The node id a node's `images`/`image` input comes from."""
    inputs = api[node_id]["inputs"]
    link = inputs.get("images") or inputs.get("image")
    return link[0]


def comfyui_dir_from_env():
    """For scripts: COMFYUI_DIR must point at a ComfyUI folder."""
    value = os.environ.get("COMFYUI_DIR")
    if not value or not (Path(value) / "main.py").is_file():
        raise SystemExit("set COMFYUI_DIR to a ComfyUI folder (e.g. made by .ci/get_comfyui.sh DIR)")
    return Path(value)


def import_pack(name):
    """Import the pack's __init__.py as a package called `name`, as ComfyUI does with a custom-node folder (once:
    a second call returns the same module). ComfyUI's folder must already be on sys.path."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, REPO / "__init__.py", submodule_search_locations=[str(REPO)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
