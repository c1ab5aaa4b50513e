"""Node-pack parts that need no ComfyUI: type conversions, the preview fit, the workflows and their twins."""

import importlib.util
import json
import re
import sys

import numpy as np
import pytest
import torch

from nodes_support import REPO, WORKFLOW_NAMES, WORKFLOWS

sys.path.insert(0, str(WORKFLOWS))
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


def test_size_errors_name_the_input_and_the_multiple():
    types.check_multiple("image", 32, 48, 16)
    with pytest.raises(types.InputError, match=r"^image: size 30x48 is not a multiple of 16.*32x48"):
        types.check_multiple("image", 30, 48, 16)
    with pytest.raises(types.InputError, match=r"^height: 100 is not a multiple of 16.*try 96"):
        types.check_side("height", 100, 16)
    with pytest.raises(types.InputError, match=r"^prompt: must not be empty"):
        types.check_text("prompt", " \n", "describe it")


def test_latent_output_is_raw_vae_latents():
    class Config:
        scaling_factor, shift_factor = 1.5305, 0.0609

    latents = torch.randn(1, 16, 4, 4)
    samples = types.latent_to_comfy(latents, Config, "cpu")["samples"]
    torch.testing.assert_close((samples - 0.0609) * 1.5305, latents)


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
    factors = preview.fit_latent_rgb(model)
    assert factors.shape == (17, 3)
    image = torch.zeros(1, 3, 64, 64)
    image[:, 0, :, :32] = 1.0  # left half red, right half black
    latents = preview.encode_mean(model.vae, image)
    shown = torch.from_numpy(np.array(preview.latent_to_rgb_image(latents, factors))).float()
    expected = torch.nn.functional.avg_pool2d(image, 8)[0].permute(1, 2, 0) * 255
    assert shown.shape == (8, 8, 3)
    assert (shown - expected).abs().max() <= 1.0


def test_own_latent_preview_runs_on_the_tiny_model():
    from tiny_models import golden_model

    model = golden_model()
    factors = preview.fit_latent_rgb(model)
    latents = model.encode_images(torch.rand(2, 3, 32, 32), torch.Generator().manual_seed(0))
    assert preview.latent_to_rgb_image(latents, factors).size == (16, 16)


# ---- workflows ------------------------------------------------------------------------------------


def test_six_workflows_with_api_twins_that_match():
    assert sorted(p.stem for p in make_api.ui_workflows()) == sorted(WORKFLOW_NAMES)
    assert make_api.convert_all(make_api.load_schema(), check=True) == []


def test_workflows_name_their_model_files():
    for path in make_api.ui_workflows():
        ui = json.loads(path.read_text(encoding="utf-8"))
        assert ui["version"] == 0.4 and ui["last_node_id"] == max(n["id"] for n in ui["nodes"])
        loaders = [n for n in ui["nodes"] if n["type"] == "UniAlignLoader"]
        assert len(loaders) == 1, path.name
        models = loaders[0]["properties"]["models"]
        named = {(m["directory"], m["name"]) for m in models}
        model, text_encoder, vae, _ = loaders[0]["widgets_values"]
        assert {("unialignment", model), ("text_encoders", text_encoder), ("vae", vae)} == named, path.name
        assert all(m["url"].startswith("https://") for m in models)


def test_edit_caption_loop_feeds_the_caption_into_a_new_generation():
    api = json.loads((WORKFLOWS / "api" / "edit_caption_loop.json").read_text())
    by_class = {}
    for node_id, node in api.items():
        by_class.setdefault(node["class_type"], []).append(node_id)
    (edit,), (understand,), (generate,) = by_class["UniAlignEdit"], by_class["UniAlignUnderstand"], by_class["UniAlignTextToImage"]
    assert api[understand]["inputs"]["image"] == [edit, 0]
    assert api[generate]["inputs"]["prompt"] == [understand, 0]
    saved = {api[s]["inputs"]["images"][0] for s in by_class["SaveImage"]}
    assert saved == {edit, generate}  # results 1 and 3; result 2 (the caption) shows on the Understand node


def test_ui_to_api_reports_a_broken_workflow():
    schema = make_api.load_schema()
    ui = json.loads((WORKFLOWS / "text_to_image.json").read_text())
    ui["nodes"][1]["widgets_values"] = ui["nodes"][1]["widgets_values"][:3]
    with pytest.raises(make_api.WorkflowError, match="widgets_values has 3 values"):
        make_api.ui_to_api(ui, schema, "text_to_image.json")


# ---- packaging ------------------------------------------------------------------------------------


def test_pack_never_installs_or_downloads():
    sources = [REPO / "__init__.py", *sorted((REPO / "nodes").glob("*.py"))]
    forbidden = re.compile(r"\b(import pip|pip install|subprocess|urllib|requests|hf_hub_download|"
                           r"snapshot_download|os\.system)\b")
    for path in sources:
        match = forbidden.search(path.read_text())
        assert match is None, f"{path.name}: {match.group(0)}"
    assert "from .nodes import" in (REPO / "__init__.py").read_text()
