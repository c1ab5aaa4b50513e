"""Node-pack parts that need no ComfyUI: type conversions, the preview fit, the workflows and their twins."""

import importlib.util
import json
import re
import sys

import numpy as np
import pytest
import torch

from nodes_support import REPO, WORKFLOW_NAMES, WORKFLOWS
from unialign_core.model import fit_latent_rgb
from unialign_core.vae import encode_mean

sys.path.insert(0, str(REPO / "tools"))
import make_api  # noqa: E402


def load_module(relative):
    """Load a ComfyUI-free module of the pack by path (the pack itself imports ComfyUI)."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(f"unialign_pack_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


types = load_module("nodes/image_types.py")
preview = load_module("nodes/preview.py")


# ---- IMAGE <-> core -------------------------------------------------------------------------------


def test_rgb_image_round_trip():
    image = torch.rand(2, 8, 12, 3)
    core = types.image_to_core(image, "image")
    assert core.shape == (2, 3, 8, 12)
    torch.testing.assert_close(types.image_from_core(core, "cpu"), image)


def test_grayscale_alpha_and_unbatched_images_are_converted():
    gray = torch.rand(1, 4, 4, 1)
    assert torch.equal(types.image_to_core(gray, "image"), gray.movedim(-1, 1).expand(-1, 3, -1, -1))
    rgba = torch.zeros(1, 4, 4, 4)
    rgba[..., 0] = 1.0  # red, fully transparent: white
    rgba[0, 0, 0, 3] = 1.0  # one opaque red pixel
    core = types.image_to_core(rgba, "image")
    assert torch.equal(core[0, :, 1, 1], torch.ones(3))
    assert torch.equal(core[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    gray_alpha = torch.stack([torch.full((1, 4, 4), 0.2), torch.full((1, 4, 4), 0.5)], -1)
    torch.testing.assert_close(types.image_to_core(gray_alpha, "image"), torch.full((1, 3, 4, 4), 0.6))
    assert types.image_to_core(torch.rand(4, 4, 3), "image").shape == (1, 3, 4, 4)


@pytest.mark.parametrize("shape", [(1, 4, 4, 5), (4, 4), (0, 4, 4, 3)])
def test_bad_image_shapes_name_the_input(shape):
    with pytest.raises(types.InputError, match=r"^reference_2: "):
        types.image_to_core(torch.rand(*shape), "reference_2")


def test_the_cores_input_errors_name_the_node_input():
    """The nodes repeat no check of the core's: its InputError is raised naming the node's input."""
    from unialign_core.images import check_size

    with pytest.raises(types.InputError, match=r"^reference_2: size 30x48 is not a multiple of 16.*32x48") as e:
        with types.core_inputs({"reference 2": "reference_2"}):
            check_size(30, 48, 16, "reference 2")
    assert e.value.input_name == "reference_2"
    for copy in ("check_multiple", "check_side", "check_text", "check_fits"):
        assert not hasattr(types, copy), copy


def test_latent_output_is_raw_vae_latents():
    from tiny_models import golden_model

    model = golden_model()
    config = model.vae.config
    latents = torch.randn(1, 16, 4, 4)
    samples = types.latent_to_comfy(latents, model, "cpu")["samples"]
    torch.testing.assert_close((samples - config.shift_factor) * config.scaling_factor, latents)


# ---- the preview fallback -------------------------------------------------------------------------


class LinearVAE(torch.nn.Module):
    """A stand-in VAE whose latents are a known linear function of the pooled pixels."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Parameter(torch.randn(16, 3, generator=torch.Generator().manual_seed(1)))
        self.config = type("Config", (), {"shift_factor": 0.1, "scaling_factor": 1.5})

    @property
    def device(self):
        return self.mix.device

    @property
    def dtype(self):
        return self.mix.dtype

    def encode(self, x):
        pooled = torch.nn.functional.avg_pool2d(x, 8)
        mean = torch.einsum("cd,bdhw->bchw", self.mix, pooled)
        return type("Out", (), {"latent_dist": type("Dist", (), {"mean": mean})})


def test_own_latent_preview_recovers_a_linear_vae():
    model = type("Model", (), {"vae": LinearVAE(), "pixel_multiple": 16})
    factors = fit_latent_rgb(model)
    assert factors.shape == (17, 3)
    image = torch.zeros(1, 3, 64, 64)
    image[:, 0, :, :32] = 1.0  # left half red, right half black
    latents = encode_mean(model.vae, image)
    shown = torch.from_numpy(np.array(preview.latent_to_rgb_image(latents, factors))).float()
    expected = torch.nn.functional.avg_pool2d(image, 8)[0].permute(1, 2, 0) * 255
    assert shown.shape == (8, 8, 3)
    assert (shown - expected).abs().max() <= 1.0


def test_own_latent_preview_runs_on_the_tiny_model():
    from tiny_models import golden_model

    model = golden_model()
    factors = model.fit_latent_rgb()
    latents = model.encode_images(torch.rand(2, 3, 32, 32), torch.Generator().manual_seed(0))
    assert preview.latent_to_rgb_image(latents, factors).size == (16, 16)


# ---- workflows ------------------------------------------------------------------------------------


def test_six_workflows_with_api_twins_that_match():
    assert [make_api.short_name(p) for p in make_api.ui_workflows()] == list(WORKFLOW_NAMES)  # in template order
    assert make_api.convert_all(make_api.load_schema(), check=True) == []


def test_workflows_name_their_model_files():
    for path in make_api.ui_workflows():
        ui = json.loads(path.read_text(encoding="utf-8"))
        assert ui["version"] == 0.4 and ui["last_node_id"] == max(n["id"] for n in ui["nodes"])
        loaders = [n for n in ui["nodes"] if n["type"] == "UniAlignLoader"]
        assert len(loaders) == 1, path.name
        models = loaders[0]["properties"]["models"]
        model, text_encoder, vae, _, weight_dtype = loaders[0]["widgets_values"]
        assert weight_dtype == "default", path.name  # full precision unless the user picks fp8
        # Model metadata only for files that download as they are, each with its link (frontend 1.27.10 rejects a
        # whole workflow with an entry that has no url, "Invalid workflow against zod schema"): T5. Our converted
        # single file and the SD3 VAE (saved under a new name) have none; the Loader's messages say how to get them.
        assert [(m["directory"], m["name"]) for m in models] == [("text_encoders", text_encoder)], path.name
        for m in models:
            assert set(m) == {"name", "url", "directory"}, (path.name, m)
            assert m["url"].startswith("https://") and "/resolve/" in m["url"], (path.name, m)
            assert m["url"].rsplit("/", 1)[1] == m["name"], (path.name, m)
        assert model == "unialignment.safetensors" and vae == "sd3_vae.safetensors", path.name


def test_only_workflows_at_the_top_of_workflows_with_a_thumbnail_each():
    """ComfyUI offers every top-level workflows/*.json as a template, titled with its file name, with
    <file name>.jpg as its thumbnail."""
    from PIL import Image

    assert make_api.SCHEMA_PATH == WORKFLOWS / "schema" / "node_schema.json" and make_api.SCHEMA_PATH.is_file()
    tops = sorted(WORKFLOWS.glob("*.json"))
    assert tops == make_api.ui_workflows() and set(tops) >= {make_api.ui_path(n) for n in WORKFLOW_NAMES}
    for path in tops:
        ui = json.loads(path.read_text(encoding="utf-8"))
        assert isinstance(ui.get("nodes"), list) and "links" in ui, f"{path.name} is not a workflow"
    # ComfyUI serves the whole folder over HTTP: data only, no scripts (they live in tools/)
    assert not [p.name for p in WORKFLOWS.rglob("*") if p.suffix in (".py", ".sh", ".js")]
    for name in WORKFLOW_NAMES:
        thumb = make_api.ui_path(name).with_suffix(".jpg")
        assert thumb.is_file(), f"{make_api.ui_path(name).name} has no thumbnail {thumb.name}"
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and im.width >= 256 and im.height >= 192


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_stacked_nodes_leave_room_for_the_title_and_badge(name):
    """A node's title bar (30 px) and badge sit above its pos: the node above must end 50 px higher."""
    nodes = json.loads(make_api.ui_path(name).read_text())["nodes"]
    for a in nodes:
        for b in nodes:
            overlap_x = a["pos"][0] < b["pos"][0] + b["size"][0] and b["pos"][0] < a["pos"][0] + a["size"][0]
            if a is b or not overlap_x or b["pos"][1] < a["pos"][1]:
                continue
            gap = b["pos"][1] - (a["pos"][1] + a["size"][1])
            assert gap >= 50, f"{name}: node {b['id']} starts {gap} px below node {a['id']}"


def test_understand_text_is_shown_but_never_saved_in_the_workflow(tmp_path):
    """web/show_text.js in node, with stand-ins for the frontend: the text shows after a run, and the saved
    node's widgets_values are exactly the input widgets' values; image nodes show a cut-prompt warning."""
    import shutil
    import subprocess

    node = shutil.which("node")
    if node is None:
        pytest.skip("node (JavaScript) is not installed")
    source = (REPO / "web" / "show_text.js").read_text()
    imports = re.findall(r"^import .*$", source, flags=re.M)
    assert imports == ['import { app } from "../../scripts/app.js";'], imports  # the public API only
    code = re.sub(r"//.*$", "", source, flags=re.M)
    assert "ComfyWidgets" not in code and "widgets.js" not in code
    source = re.sub(r"^import .*$", "", source, flags=re.M).replace("export function", "function")
    stubs = r"""
const app = { registerExtension: (e) => { globalThis.ext = e; } };
globalThis.document = { createElement: (tag) => ({ tag, value: "", style: {} }) };
globalThis.requestAnimationFrame = (f) => 0;
// node.addDOMWidget as both frontends define it: options.getValue/setValue back the widget's value.
function addDOMWidget(name, type, element, options) {
  const w = { name, type, element, options, get value() { return options.getValue(); }, set value(v) { options.setValue(v); } };
  this.widgets.push(w);
  return w;
}
"""
    run = r"""
function serialize(node) { const o = { widgets_values: node.widgets.map((w) => w.value) }; node.onSerialize?.(o); return o; }
const out = {};
for (const name of ["UniAlignUnderstand", "UniAlignTextToImage"]) {
  function NodeType() { this.widgets = [{ name: "sampler", value: "confidence" }, { name: "length", value: 32 }]; this.size = [400, 300]; }
  NodeType.prototype.computeSize = function () { return [400, 320]; };
  NodeType.prototype.addDOMWidget = addDOMWidget;
  ext.beforeRegisterNodeDef(NodeType, { name });
  const n = new NodeType();
  out[name] = { before: serialize(n).widgets_values };
  n.onExecuted({ text: name === "UniAlignUnderstand" ? ["a red cube"] : ["prompt: ... cut and not used: 'x'"] });
  out[name].shown = n.widgets.map((w) => [w.name, w.value]);
  const shown = n.widgets[n.widgets.length - 1];
  out[name].widget = { tag: shown.element.tag, readOnly: shown.element.readOnly, sent: shown.options.serialize !== false };
  out[name].after = serialize(n).widgets_values;
}
console.log(JSON.stringify(out));
"""
    script = stubs + source + run
    path = tmp_path / "harness.js"
    path.write_text(script)
    result = subprocess.run([node, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    understand, t2i = out["UniAlignUnderstand"], out["UniAlignTextToImage"]
    assert understand["shown"][-1] == ["result_text", "a red cube"]
    assert understand["after"] == understand["before"] == ["confidence", 32]
    assert understand["widget"] == {"tag": "textarea", "readOnly": True, "sent": False}
    assert t2i["shown"][-1][0] == "warnings" and "cut" in t2i["shown"][-1][1]
    assert t2i["after"] == ["confidence", 32]


def test_edit_caption_loop_feeds_the_caption_into_a_new_generation():
    api = json.loads((WORKFLOWS / "api" / "edit_caption_loop.json").read_text())
    by_class = {}
    for node_id, node in api.items():
        by_class.setdefault(node["class_type"], []).append(node_id)
    (edit,), (understand,), (generate,) = (
        by_class["UniAlignEdit"],
        by_class["UniAlignUnderstand"],
        by_class["UniAlignTextToImage"],
    )
    assert api[understand]["inputs"]["image"] == [edit, 0]
    assert api[generate]["inputs"]["prompt"] == [understand, 0]
    saved = {api[s]["inputs"]["images"][0] for s in by_class["SaveImage"]}
    assert saved == {edit, generate}  # results 1 and 3; result 2 (the caption) shows on the Understand node


def test_ui_to_api_reports_a_broken_workflow():
    schema = make_api.load_schema()
    ui = json.loads(make_api.ui_path("text_to_image").read_text())
    ui["nodes"][1]["widgets_values"] = ui["nodes"][1]["widgets_values"][:3]
    with pytest.raises(make_api.WorkflowError, match="widgets_values has 3 values"):
        make_api.ui_to_api(ui, schema, "text_to_image.json")


# ---- packaging ------------------------------------------------------------------------------------


def test_pack_never_installs_or_downloads():
    sources = [REPO / "__init__.py", *sorted((REPO / "nodes").glob("*.py"))]
    forbidden = re.compile(
        r"\b(import pip|pip install|subprocess|urllib|requests|hf_hub_download|"
        r"snapshot_download|os\.system)\b"
    )
    for path in sources:
        match = forbidden.search(path.read_text())
        assert match is None, f"{path.name}: {match.group(0)}"
    assert "from .nodes import" in (REPO / "__init__.py").read_text()


def test_requirements_install_libraries_only():
    """`pip install -r requirements.txt` into ComfyUI's Python adds no package of ours (no top-level `train` or
    `unialign_core` in site-packages): every line is a requirement on a library from the index, and pyproject reads
    its dependencies from that one list."""
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    requirements = [line for line in lines if line]
    assert requirements and all(re.fullmatch(r"[A-Za-z0-9_.\-]+([<>=!~]=?[0-9.*]+)?", r) for r in requirements), (
        requirements
    )
    assert 'dynamic = ["dependencies"]' in (REPO / "pyproject.toml").read_text()
