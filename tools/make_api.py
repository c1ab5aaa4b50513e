"""Make the API-format twins of the UI-format workflows, so the two cannot drift.

    python tools/make_api.py                 # write workflows/api/<name>.json for every UI workflow
    python tools/make_api.py --check         # exit 1 if a twin is missing or differs, or a layout check fails
    python tools/make_api.py --schema-from http://127.0.0.1:8188    # first refresh schema/node_schema.json
    python tools/make_api.py --schema-from object_info.json         # (from a running ComfyUI or a saved reply)

The UI files are named for ComfyUI's template browser, which shows each top-level `workflows/*.json` under its
file name (without `.json`), with `<file name>.jpg` as its thumbnail: "1 Text to image.json" and so on, numbered
in the order to read them. The API twins (`api/<name>.json`), the README pictures (`images/<name>.png`) and the
tests use short names without spaces; WORKFLOWS below is the one map between the two.

The frontend saves widget values by position (`widgets_values`), so the conversion needs each node's
widget order. `schema/node_schema.json` holds it for the node types the workflows use, taken from a ComfyUI
server's /object_info; the server tests check it against the live server. It lives in a subfolder because
ComfyUI offers every top-level `workflows/*.json` as a template: only workflows may be there. Standard library only.
"""

import argparse
import json
import sys
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "workflows"  # the workflows; this script is not served from there
API_DIR = HERE / "api"
SCHEMA_PATH = HERE / "schema" / "node_schema.json"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
# The 2024 frontend adds a control widget to INT inputs with these names even without control_after_generate.
SEED_NAMES = ("seed", "noise_seed")

# Short name (api/<name>.json, images/<name>.png, the tests) -> the UI file's name, which is its title in the
# template browser. The numbers give the order where the list is sorted by name (ComfyUI 0.3.64 lists the folder
# unsorted). No characters that a URL path would need escaped beyond spaces (the frontend fetches
# `<name>.json` and `<name>.jpg` unescaped; the browser sends a space as %20, which aiohttp's static route decodes).
WORKFLOWS = {
    "text_to_image": "1 Text to image",
    "edit": "2 Edit an image",
    "multi_edit": "3 Edit in three steps",
    "perception": "4 Depth, edges and pose",
    "personalisation": "5 Personalise from images",
    "understanding": "6 Understand an image",
    "edit_caption_loop": "7 Edit, caption, generate",
    "native_ksampler": "8 Native KSampler",
    "native_edit_caption_loop": "9 Native edit, caption, generate",
}
# The native workflows (8, 9) use ComfyUI's SD3-era core nodes (KSampler on a flow MODEL, EmptySD3LatentImage,
# DualCFGGuider, SamplerCustomAdvanced, ModelSamplingSD3): refresh the schema from a ComfyUI 0.3.x server; the
# March 2024 ComfyUI lacks some of them (its server tests skip those workflows).
# The saved view (extra.ds) and node titles, checked by --check. Frontend 1.58.1 draws its graph toolbar over the
# top ~80 px of the canvas and its side bar over the left edge; the view puts the top-left node's title bar about
# 120 px down and 60 px in at the saved scale. LiteGraph draws titles in a ~14 px font, about 7.5 px a character,
# after the collapse dot; a longer title is cut with "...". (1.58.1 fits the view to the graph when a workflow is
# opened from the template browser; the saved view counts when the file is dropped or opened, and in 1.27.)
VIEW_LEFT, VIEW_TOP = 60, 120
TITLE_BAR_HEIGHT = 30
TITLE_CHAR_WIDTH, TITLE_MARGIN = 7.5, 40


class WorkflowError(ValueError):
    pass


def ui_workflows():
    return sorted(HERE.glob("*.json"))  # every top-level .json is a workflow (ComfyUI lists them as templates)


def ui_path(name):
    """The UI workflow of a short name: ui_path("edit") is workflows/2 Edit an image.json."""
    return HERE / f"{WORKFLOWS[name]}.json"


def short_name(path):
    """The short name of a UI workflow file (the inverse of ui_path)."""
    for name, title in WORKFLOWS.items():
        if Path(path).stem == title:
            return name
    raise WorkflowError(f"{Path(path).name} is not in make_api.WORKFLOWS: add its short name there")


def _ordered_inputs(info):
    """(section, name, spec) in the order the frontend builds widgets: required, then optional."""
    order = info.get("input_order") or {}
    out = []
    for section in ("required", "optional"):
        specs = info.get("input", {}).get(section, {}) or {}
        names = order.get(section) or list(specs)
        out += [(section, name, specs[name]) for name in names if name in specs]
    return out


def node_schema(info):
    """The part of one /object_info entry the conversion needs."""
    widgets, inputs = [], {}
    for _, name, spec in _ordered_inputs(info):
        kind = spec[0]
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        type_name = "COMBO" if isinstance(kind, list) else kind
        inputs[name] = type_name
        if type_name in WIDGET_TYPES and not options.get("forceInput"):
            extra = 0
            if options.get("control_after_generate") or (type_name == "INT" and name in SEED_NAMES):
                extra += 1  # the "control after generate" value (fixed / increment / randomize)
            if options.get("image_upload"):
                extra += 1  # LoadImage's upload button
            widgets.append([name, extra])
    return {
        "inputs": inputs,
        "widgets": widgets,
        "outputs": list(info.get("output", [])),
        "output_node": bool(info.get("output_node", False)),
    }


def schema_from_object_info(object_info, classes):
    missing = sorted(c for c in classes if c not in object_info)
    if missing:
        raise WorkflowError(f"the server does not know the node types {missing}")
    return {c: node_schema(object_info[c]) for c in sorted(classes)}


def load_schema():
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def used_classes(paths=None):
    classes = set()
    for path in paths or ui_workflows():
        classes |= {n["type"] for n in json.loads(path.read_text(encoding="utf-8"))["nodes"]}
    return classes


def ui_to_api(ui, schema, name="workflow"):
    """Convert a UI-format workflow (frontend save, version 0.4) to the API format POST /prompt takes."""
    links = {}
    for link in ui.get("links", []):
        link_id, from_node, from_slot, to_node, to_slot, type_name = link[:6]
        links[link_id] = (str(from_node), int(from_slot), type_name)
    api = {}
    for node in sorted(ui["nodes"], key=lambda n: int(n["id"])):
        node_id, cls = str(node["id"]), node["type"]
        where = f"{name}: node {node_id} ({cls})"
        if node.get("mode", 0) != 0:
            raise WorkflowError(f"{where}: muted or bypassed nodes are not supported in example workflows")
        if cls not in schema:
            raise WorkflowError(f"{where}: node type not in {SCHEMA_PATH.name}; refresh it with --schema-from")
        spec = schema[cls]
        linked = {}
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                if socket["link"] not in links:
                    raise WorkflowError(
                        f"{where}: input {socket['name']!r} uses link {socket['link']}, which is not in 'links'"
                    )
                linked[socket["name"]] = links[socket["link"]]
        values = node.get("widgets_values", [])
        if isinstance(values, dict):
            raise WorkflowError(f"{where}: widgets_values as a dict is not supported")
        widget_values, i = {}, 0
        for widget, extra in spec["widgets"]:
            if i >= len(values):
                raise WorkflowError(
                    f"{where}: widgets_values has {len(values)} values, the node needs more (missing {widget!r})"
                )
            widget_values[widget] = values[i]
            i += 1 + extra
        inputs = {}
        for input_name in spec["inputs"]:
            if input_name in linked:
                from_node, from_slot, _ = linked[input_name]
                inputs[input_name] = [from_node, from_slot]
            elif input_name in widget_values:
                inputs[input_name] = widget_values[input_name]
        unknown = sorted(set(linked) - set(spec["inputs"]))
        if unknown:
            raise WorkflowError(f"{where}: links into unknown inputs {unknown}")
        api[node_id] = {"class_type": cls, "inputs": inputs, "_meta": {"title": node.get("title") or cls}}
    return api


def check_ui(ui, schema, name="workflow"):
    """Structural checks beyond the conversion: link ends and types agree with the schema."""
    nodes = {str(n["id"]): n for n in ui["nodes"]}
    problems = []
    for link in ui.get("links", []):
        link_id, from_node, from_slot, to_node, to_slot, type_name = link[:6]
        src, dst = nodes.get(str(from_node)), nodes.get(str(to_node))
        if src is None or dst is None:
            problems.append(f"link {link_id}: missing node")
            continue
        outputs = schema[src["type"]]["outputs"]
        if from_slot >= len(outputs) or outputs[from_slot] != type_name:
            problems.append(f"link {link_id}: output {from_slot} of {src['type']} is not {type_name}")
        socket = dst["inputs"][to_slot] if to_slot < len(dst.get("inputs", [])) else None
        if socket is None or socket.get("link") != link_id:
            problems.append(f"link {link_id}: input slot {to_slot} of node {to_node} does not point back")
            continue
        want = schema[dst["type"]]["inputs"].get(socket["name"])
        if want != type_name and not (want == "COMBO" and type_name == "COMBO"):
            problems.append(f"link {link_id}: input {socket['name']!r} of {dst['type']} is {want}, link is {type_name}")
        if str(link_id) not in {str(x) for x in src["outputs"][from_slot].get("links") or []}:
            problems.append(f"link {link_id}: output slot {from_slot} of node {from_node} does not list it")
    if problems:
        raise WorkflowError(f"{name}: " + "; ".join(problems))


def check_layout(ui, name="workflow"):
    """The saved view shows the whole top-left of the graph below the toolbar; every explicit title fits its node."""
    problems = []
    ds = ui.get("extra", {}).get("ds") or {}
    scale, offset = ds.get("scale"), ds.get("offset")
    if not scale or not offset:
        problems.append("extra.ds (the saved view) is missing")
    else:
        left = (min(n["pos"][0] for n in ui["nodes"]) + offset[0]) * scale
        top = (min(n["pos"][1] for n in ui["nodes"]) - TITLE_BAR_HEIGHT + offset[1]) * scale
        if not (VIEW_LEFT - 20 <= left <= VIEW_LEFT + 40 and VIEW_TOP - 20 <= top <= VIEW_TOP + 40):
            problems.append(
                f"the saved view puts the graph's top left at ({left:.0f}, {top:.0f}) px, "
                f"not about ({VIEW_LEFT}, {VIEW_TOP}): set extra.ds"
            )
    for node in ui["nodes"]:
        title = node.get("title")
        if title and len(title) * TITLE_CHAR_WIDTH > node["size"][0] - TITLE_MARGIN:
            problems.append(f"node {node['id']}: the title {title!r} does not fit the node's width {node['size'][0]}")
    return [f"{name}: {p}" for p in problems]


def api_text(api):
    return json.dumps(api, indent=2, ensure_ascii=False) + "\n"


def twin_path(path):
    return API_DIR / f"{short_name(path)}.json"


def convert_all(schema, check=False):
    """Write (or, with check=True, compare) every twin. Returns the list of problems."""
    problems = []
    API_DIR.mkdir(exist_ok=True)
    for path in ui_workflows():
        ui = json.loads(path.read_text(encoding="utf-8"))
        check_ui(ui, schema, path.name)
        problems += check_layout(ui, path.name)
        text = api_text(ui_to_api(ui, schema, path.name))
        target = twin_path(path)
        if check:
            if not target.is_file() or target.read_text(encoding="utf-8") != text:
                problems.append(f"{target.relative_to(HERE.parent)} is missing or differs from {path.name}")
        else:
            target.write_text(text, encoding="utf-8")
    problems += [
        f"{title}.json (short name {name}) is missing"
        for name, title in WORKFLOWS.items()
        if not ui_path(name).is_file()
    ]
    stale = sorted(p.name for p in API_DIR.glob("*.json") if p.stem not in WORKFLOWS or not ui_path(p.stem).is_file())
    problems += [f"api/{n} has no UI workflow" for n in stale]
    return problems


def fetch_object_info(source):
    if source.startswith(("http://", "https://")):
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(source.rstrip("/") + "/object_info", timeout=60) as reply:
            return json.loads(reply.read())
    return json.loads(Path(source).read_text(encoding="utf-8"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on any difference")
    parser.add_argument(
        "--schema-from", metavar="URL_OR_FILE", help="refresh schema/node_schema.json from /object_info"
    )
    args = parser.parse_args(argv)
    try:
        if args.schema_from:
            schema = schema_from_object_info(fetch_object_info(args.schema_from), used_classes())
            SCHEMA_PATH.write_text(json.dumps(schema, indent=1) + "\n", encoding="utf-8")
        problems = convert_all(load_schema(), check=args.check)
    except WorkflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for problem in problems:
        print(problem, file=sys.stderr)
    if not args.check:
        print(f"wrote {len(ui_workflows())} API workflows to {API_DIR}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
