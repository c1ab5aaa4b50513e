"""Render one PNG per example workflow for the README: run it through a real ComfyUI server and lay its
inputs and outputs side by side.

    COMFYUI_DIR=/path/to/ComfyUI python tools/render_images.py [name ...]
    COMFYUI_DIR=/path/to/ComfyUI python tools/render_images.py --shapes runs/shapes/shapes.safetensors

By default the workflows run on the tiny random-weight test model, so the pictures show what each workflow
produces and how it is wired, not image quality (workflows/images/<name>.png). With ``--shapes`` they run on the
model that ``python -m train.shapes`` trained and exported: the same graphs with 32 px images and texts of the
shapes world, on held-out scenes (workflows/images/shapes_<name>.png).

Each run also writes the template thumbnail workflows/<name>.jpg (what ComfyUI's template browser shows beside
the workflow) from those pictures: the shapes picture where there is one, else the tiny-model one.

    python tools/render_images.py --thumbnails      # only the thumbnails, from the PNGs already there
"""

import argparse
import json
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from PIL import Image, ImageDraw  # noqa: E402

from comfy_server import ComfyServer  # noqa: E402
from nodes_support import (  # noqa: E402
    INPUT_IMAGES,
    WORKFLOW_NAMES,
    comfyui_dir_from_env,
    load_api,
    make_input_images,
    make_models_dir,
    output_files,
    run,
    tiny_settings,
)

OUT = REPO / "workflows" / "images"
TILE = 128
PAD = 8
LABEL = 28
TEXT_WIDTH = 260
BACKGROUND = (245, 245, 245)
INK = (30, 30, 30)


def tile(image, label):
    canvas = Image.new("RGB", (TILE, TILE + LABEL), BACKGROUND)
    canvas.paste(image.convert("RGB").resize((TILE, TILE), Image.NEAREST), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(textwrap.wrap(label, 22)[:2]):
        draw.text((2, TILE + 2 + 12 * i), line, fill=INK)
    return canvas


def text_panel(title, text):
    lines = [title] + textwrap.wrap(text or "(empty)", 42)[:9]
    canvas = Image.new("RGB", (TEXT_WIDTH, TILE + LABEL), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((6, 6 + 14 * i), line, fill=INK if i else (20, 60, 160))
    return canvas


def contact_sheet(name, panels, note="tiny random-weight test model: wiring, not quality"):
    width = sum(p.width for p in panels) + PAD * (len(panels) + 1)
    sheet = Image.new("RGB", (width, TILE + LABEL + 2 * PAD + 20), BACKGROUND)
    ImageDraw.Draw(sheet).text((PAD, 4), f"{name}  ({note})", fill=INK)
    x = PAD
    for panel in panels:
        sheet.paste(panel, (x, 20 + PAD))
        x += panel.width + PAD
    return sheet


# The shapes world's version of each workflow's texts (the graphs stay the same).
SHAPES_TEXTS = {
    "UniAlignTextToImage": {
        "prompt": "a green circle on the left and a magenta square on the right on a gray background"
    },
    "UniAlignEdit": {"instruction": "change the colour of the red square to green"},
    "UniAlignCompose": {"prompt": "draw this shape on the right, gray background"},
    "UniAlignUnderstand": {"question": "what colour is the square?"},
}
SHAPES_SIDE = 32


def shapes_settings(api, model_name):
    """An example workflow for the shapes model: its file, 32 px images, world texts, world-sized steps."""
    api = json.loads(json.dumps(api))
    questions = iter(["", SHAPES_TEXTS["UniAlignUnderstand"]["question"]])
    for node in (api[k] for k in sorted(api, key=int)):
        inputs, cls = node["inputs"], node["class_type"]
        if cls == "UniAlignLoader":
            inputs.update(model=model_name, text_encoder="(from model)", vae="(from model)", dtype="fp32")
        elif cls == "ImageScale":
            inputs.update(width=SHAPES_SIDE, height=SHAPES_SIDE, upscale_method="nearest-exact")
        elif cls in ("UniAlignTextToImage", "UniAlignCompose"):
            inputs.update(width=SHAPES_SIDE, height=SHAPES_SIDE, steps=20, guidance=3.0)
        elif cls in ("UniAlignEdit", "UniAlignPerceive"):
            inputs.update(steps=20, guidance=3.0)
        elif cls == "UniAlignUnderstand":
            inputs.update(length=24, steps=16)
            if not isinstance(inputs.get("question"), str) or inputs["question"]:
                inputs["question"] = next(questions, "") or SHAPES_TEXTS["UniAlignUnderstand"]["question"]
            continue
        for key, value in SHAPES_TEXTS.get(cls, {}).items():
            if isinstance(inputs.get(key), str):  # linked inputs (the loop's caption) stay linked
                inputs[key] = value
    return api


def shapes_input_images(folder: Path):
    """example.png: a held-out scene (a red square and a white cross); example_2.png: a reference shape."""
    from train.shapes.world import Scene, Shape, render, render_reference

    folder.mkdir(parents=True, exist_ok=True)
    scene = Scene("black", (Shape("square", "red", "left"), Shape("cross", "white", "right")))
    render(scene, SHAPES_SIDE).save(folder / INPUT_IMAGES[0])
    render_reference(Shape("triangle", "magenta", "center"), SHAPES_SIDE).save(folder / INPUT_IMAGES[1])
    return folder


def render(server, name, shapes_model=None):
    api = shapes_settings(load_api(name), shapes_model) if shapes_model else tiny_settings(load_api(name))
    entry = run(server, api)
    panels = []
    for node_id in sorted(api, key=int):
        node = api[node_id]
        title = node["_meta"]["title"]
        if node["class_type"] == "LoadImage":
            with Image.open(server.base_dir / "input" / node["inputs"]["image"]) as im:
                panels.append(tile(im, "input: " + title if title != "LoadImage" else "input image"))
        elif node["class_type"] == "SaveImage":
            for path in output_files(server, entry, node_id):
                with Image.open(path) as im:
                    source = api[node["inputs"]["images"][0]]["_meta"]["title"]
                    panels.append(tile(im, title if title != "SaveImage" else source))
        elif node["class_type"] == "UniAlignUnderstand":
            question = node["inputs"].get("question") or ""
            heading = f"Q: {question}" if question else "caption:"
            panels.append(text_panel(heading, " / ".join(entry["outputs"][node_id]["text"])))
    OUT.mkdir(exist_ok=True)
    if shapes_model:
        path = OUT / f"shapes_{name}.png"
        sheet = contact_sheet(name, panels, "the shapes-world model of python -m train.shapes")
    else:
        path, sheet = OUT / f"{name}.png", contact_sheet(name, panels)
    sheet.save(path, optimize=True)
    return path


THUMBNAIL_SIZE = (512, 384)


def write_thumbnail(name):
    """workflows/<name>.jpg from workflows/images/(shapes_)<name>.png, fitted into THUMBNAIL_SIZE."""
    sources = [OUT / f"shapes_{name}.png", OUT / f"{name}.png"]
    source = next((p for p in sources if p.is_file()), None)
    if source is None:
        raise SystemExit(f"no picture for {name}: render it first ({sources[1].relative_to(REPO)})")
    with Image.open(source) as im:
        picture = im.convert("RGB")
    picture.thumbnail(THUMBNAIL_SIZE, Image.LANCZOS)
    sheet = Image.new("RGB", THUMBNAIL_SIZE, BACKGROUND)
    sheet.paste(picture, ((THUMBNAIL_SIZE[0] - picture.width) // 2, (THUMBNAIL_SIZE[1] - picture.height) // 2))
    target = REPO / "workflows" / f"{name}.jpg"
    sheet.save(target, "JPEG", quality=85, optimize=True)
    return target


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"workflows (default: all of {', '.join(WORKFLOW_NAMES)})")
    parser.add_argument("--shapes", metavar="MODEL", help="the shapes model file (python -m train.shapes)")
    parser.add_argument("--thumbnails", action="store_true", help="only write workflows/<name>.jpg from the PNGs")
    args = parser.parse_args(argv)
    if args.thumbnails:
        for name in args.names or WORKFLOW_NAMES:
            print("wrote", write_thumbnail(name))
        return 0
    comfyui = comfyui_dir_from_env()
    with tempfile.TemporaryDirectory() as tmp:
        if args.shapes:
            models = Path(tmp) / "models"
            (models / "unialignment").mkdir(parents=True)
            shutil.copy(args.shapes, models / "unialignment" / Path(args.shapes).name)
        else:
            models = make_models_dir(Path(tmp) / "models")
        with ComfyServer(comfyui, REPO, models, Path(tmp) / "base") as server:
            if args.shapes:
                shapes_input_images(server.base_dir / "input")
            else:
                make_input_images(server.base_dir / "input")
            for name in args.names or WORKFLOW_NAMES:
                shapes_model = Path(args.shapes).name if args.shapes else None
                print("wrote", render(server, name, shapes_model))
                print("wrote", write_thumbnail(name))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
