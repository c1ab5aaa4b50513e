"""Render one PNG per example workflow for the README: run it through a real ComfyUI server and lay its
inputs and outputs side by side.

    COMFYUI_DIR=/path/to/ComfyUI python tools/render_images.py [name ...]
    COMFYUI_DIR=/path/to/ComfyUI python tools/render_images.py --shapes runs/shapes/shapes.safetensors

By default the workflows run on the tiny random-weight test model, so the pictures show what each workflow
produces and how it is wired, not image quality (workflows/images/<name>.png). With ``--shapes`` they run on the
model that ``python -m train.shapes`` trained and exported: the same graphs with 32 px images and texts of the
shapes world, on held-out scenes (workflows/images/shapes_<name>.png).

`name` is a workflow's short name (tools/make_api.py WORKFLOWS). Each run also writes the template thumbnail
(what ComfyUI's template browser shows for the workflow: workflows/<UI file name>.jpg, e.g. "2 Edit an image.jpg")
from those pictures: the shapes picture where there is one, else the tiny-model one.

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

from PIL import Image, ImageDraw, ImageFont  # noqa: E402

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
from tools.make_api import ui_path  # noqa: E402

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
    for role, node_id in sheet_plan(api):  # the thumbnails read the sheet in this order
        node = api[node_id]
        title = node["_meta"]["title"]
        if role == "input":
            with Image.open(server.base_dir / "input" / node["inputs"]["image"]) as im:
                panels.append(tile(im, "input: " + title if title != "LoadImage" else "input image"))
        elif role == "output":
            for path in output_files(server, entry, node_id):
                with Image.open(path) as im:
                    source = api[node["inputs"]["images"][0]]["_meta"]["title"]
                    panels.append(tile(im, title if title != "SaveImage" else source))
        else:
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


# ---- template thumbnails -------------------------------------------------------------------------
# The template browser shows <UI file name>.jpg in a square card (256 px in frontends 1.27 and 1.58): one picture
# of the workflow's main result, its input beside it, and one label that says which test model made it. Cut from
# the contact sheets above, so a thumbnail shows exactly what the README picture shows.

THUMBNAIL_SIZE = (512, 512)
LABEL_BAND = 80  # the label's strip at the bottom
LABEL_FONT_SIZE = 30
MARGIN = 16
GUTTER = 8  # the side margins where an input sits beside the result, leaving room for the arrow
# Which output is the main result where a workflow saves several (default: the last, e.g. the loop's generation).
MAIN_RESULT = {"perception": 0}  # the depth map
MODEL_LABELS = {"shapes": "32 px shapes test model", "tiny": "random-weight test model"}


def sheet_plan(api):
    """What render() puts on a contact sheet, in order: ("input" | "output" | "text", node id)."""
    kinds = {"LoadImage": "input", "SaveImage": "output", "UniAlignUnderstand": "text"}
    return [(kinds[api[k]["class_type"]], k) for k in sorted(api, key=int) if api[k]["class_type"] in kinds]


def sheet_panels(sheet):
    """The panels of a contact sheet, left to right: (kind, box), kind "image" (a tile) or "text"."""
    top = 20 + PAD
    band = sheet.crop((0, top, sheet.width, top + TILE)).convert("RGB")
    pixels = band.load()
    gap = [all(pixels[x, y] == BACKGROUND for y in range(band.height)) for x in range(band.width)] + [True]
    panels, start = [], None
    for x, empty in enumerate(gap):
        if not empty and start is None:
            start = x
        elif empty and start is not None:
            width = x - start
            if width not in (TILE, TEXT_WIDTH):
                raise ValueError(f"a panel {width} px wide at x={start}: not a contact sheet of render()")
            kind = "image" if width == TILE else "text"
            panels.append((kind, (start, top, x, top + (TILE if kind == "image" else TILE + LABEL))))
            start = None
    return panels


def text_crop(sheet, box):
    """The written part of a text panel (heading and answer), cropped to its ink."""
    panel = sheet.crop(box).convert("RGB")
    bbox = panel.convert("L").point(lambda v: 255 if v < 200 else 0).getbbox() or (0, 0, panel.width, panel.height)
    return panel.crop((max(bbox[0] - 4, 0), max(bbox[1] - 4, 0), bbox[2] + 4, bbox[3] + 4))


def arrow(draw, x0, x1, y):
    draw.line((x0, y, x1 - 8, y), fill=(120, 120, 120), width=5)
    draw.polygon(((x1, y), (x1 - 12, y - 10), (x1 - 12, y + 10)), fill=(120, 120, 120))


def thumbnail(name, sheet, model):
    """The square thumbnail of one workflow from its contact sheet (model: "shapes" or "tiny")."""
    plan, panels = sheet_plan(load_api(name)), sheet_panels(sheet)
    if [k == "text" for k, _ in plan] != [k == "text" for k, _ in panels]:
        raise ValueError(f"{name}: the contact sheet's panels do not match the workflow's outputs; render it again")
    crops = {"input": [], "output": [], "text": []}
    for (role, _), (_, box) in zip(plan, panels):
        crops[role].append(sheet.crop(box).convert("RGB") if role != "text" else text_crop(sheet, box))
    width, height = THUMBNAIL_SIZE
    area = height - LABEL_BAND  # the pictures' part
    canvas = Image.new("RGB", THUMBNAIL_SIZE, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    inputs = crops["input"][:2]
    if crops["output"]:
        result = crops["output"][MAIN_RESULT.get(name, -1)]
        side = 384 if not inputs else 320  # whole multiples of the 32 and 64 px outputs (tiles are 128 px)
        x = (width - side) // 2 if not inputs else width - GUTTER - side
        y = (area - side) // 2
        canvas.paste(result.resize((side, side), Image.NEAREST), (x, y))
        stack = len(inputs) * TILE + (len(inputs) - 1) * MARGIN
        for i, picture in enumerate(inputs):
            canvas.paste(picture, (GUTTER, (area - stack) // 2 + i * (TILE + MARGIN)))
        if inputs:
            arrow(draw, GUTTER + TILE + 8, x - 8, area // 2)
    else:  # understanding: the input above, the question and the answer below it
        side = 2 * TILE
        canvas.paste(inputs[0].resize((side, side), Image.NEAREST), ((width - side) // 2, MARGIN + 8))
        text = crops["text"][-1]
        box = (MARGIN, MARGIN + 8 + side + MARGIN, width - MARGIN, area - 8)
        draw.rounded_rectangle(box, radius=8, fill=(255, 255, 255))
        room_w, room_h = box[2] - box[0] - 16, box[3] - box[1] - 16
        scale = min(3.0, room_w / text.width, room_h / text.height)
        text = text.resize((round(text.width * scale), round(text.height * scale)), Image.LANCZOS)
        canvas.paste(text, (box[0] + 8, box[1] + (box[3] - box[1] - text.height) // 2))
    font = ImageFont.load_default(size=LABEL_FONT_SIZE)
    label = MODEL_LABELS[model]
    draw.rectangle((0, area, width, height), fill=(225, 225, 225))
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    draw.text(((width - right - left) // 2, area + (LABEL_BAND - bottom - top) // 2), label, fill=INK, font=font)
    return canvas


def write_thumbnail(name):
    """The template thumbnail (workflows/<UI file name>.jpg) from workflows/images/(shapes_)<name>.png: the shapes
    picture where there is one, else the tiny-model one."""
    sources = [(OUT / f"shapes_{name}.png", "shapes"), (OUT / f"{name}.png", "tiny")]
    source, model = next(((p, m) for p, m in sources if p.is_file()), (None, None))
    if source is None:
        raise SystemExit(f"no picture for {name}: render it first ({sources[1][0].relative_to(REPO)})")
    with Image.open(source) as im:
        picture = thumbnail(name, im.convert("RGB"), model)
    target = ui_path(name).with_suffix(".jpg")
    picture.save(target, "JPEG", quality=90, optimize=True)
    return target


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"workflows (default: all of {', '.join(WORKFLOW_NAMES)})")
    parser.add_argument("--shapes", metavar="MODEL", help="the shapes model file (python -m train.shapes)")
    parser.add_argument("--thumbnails", action="store_true", help="only write the thumbnails from the PNGs")
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
