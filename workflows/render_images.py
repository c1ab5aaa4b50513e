"""Render one PNG per example workflow for the README: run it through a real ComfyUI server on the
tiny test model and lay its inputs and outputs side by side.

    COMFYUI_DIR=/path/to/ComfyUI python workflows/render_images.py [name ...]

The tiny model has random weights, so the pictures show what each workflow produces and how it
is wired, not image quality. Writes workflows/images/<name>.png.
"""

import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from PIL import Image, ImageDraw  # noqa: E402

from comfy_server import ComfyServer  # noqa: E402
from nodes_support import (  # noqa: E402
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


def contact_sheet(name, panels):
    width = sum(p.width for p in panels) + PAD * (len(panels) + 1)
    sheet = Image.new("RGB", (width, TILE + LABEL + 2 * PAD + 20), BACKGROUND)
    ImageDraw.Draw(sheet).text((PAD, 4), f"{name}  (tiny random-weight test model: wiring, not quality)", fill=INK)
    x = PAD
    for panel in panels:
        sheet.paste(panel, (x, 20 + PAD))
        x += panel.width + PAD
    return sheet


def render(server, name):
    api = tiny_settings(load_api(name))
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
    path = OUT / f"{name}.png"
    contact_sheet(name, panels).save(path, optimize=True)
    return path


def main(argv):
    names = argv or list(WORKFLOW_NAMES)
    comfyui = comfyui_dir_from_env()
    with tempfile.TemporaryDirectory() as tmp:
        models = make_models_dir(Path(tmp) / "models")
        with ComfyServer(comfyui, REPO, models, Path(tmp) / "base") as server:
            make_input_images(server.base_dir / "input")
            for name in names:
                print("wrote", render(server, name))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
