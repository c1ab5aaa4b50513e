"""Starting from plain SD3-medium (diffusers layout, tiny size, the same key names as the reference key list):
norm_out/proj_out renamed, timestep embedder kept, pooled-text embedder dropped, the last block's new context path
and the text head fresh; the report says so and the start trains."""

import json
import shutil

import pytest
import torch

from tiny_models import GOLDEN, REFERENCE
from train.batch import Encoders
from train.config import InitConfig, LossConfig
from train.init import detect_kind, load_start
from train.losses import Reducer, SampleRNG, TrainModule, compute_losses


def generic(keys, last):
    """Key names with block numbers replaced: 'B' for ordinary blocks, 'LAST' for the last one."""
    out = set()
    for k in keys:
        parts = k.split(".")
        if parts[0] == "transformer_blocks":
            parts[1] = "LAST" if int(parts[1]) == last else "B"
        out.add(".".join(parts))
    return out


def tsv_keys(name):
    with open(REFERENCE / name) as f:
        return [line.split("\t")[0] for line in f if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    from diffusers import SD3Transformer2DModel

    root = tmp_path_factory.mktemp("sd3")
    config = json.loads((GOLDEN / "transformer" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_") and k != "vocab_size"}
    torch.manual_seed(0)
    SD3Transformer2DModel(**config).save_pretrained(root / "transformer")
    for src, dst in (
        ("text_encoder", "text_encoder_3"),
        ("tokenizer", "tokenizer_3"),
        ("vae", "vae"),
        ("scheduler", "scheduler"),
    ):
        shutil.copytree(GOLDEN / src, root / dst)
    return root


def test_tiny_sd3_has_the_reference_key_names(sd3_folder):
    from safetensors.torch import load_file

    tiny = load_file(str(sd3_folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert generic(tiny, 2) == generic(tsv_keys("sd3_medium_transformer_keys.tsv"), 23)


def test_init_from_sd3_reports_mapping_and_trains(sd3_folder):
    from safetensors.torch import load_file

    assert detect_kind(str(sd3_folder)) == "sd3"
    source = load_file(str(sd3_folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    bundle, transformer, report = load_start(InitConfig(path=str(sd3_folder)), align_dim=24)
    text = report.summary()
    assert "norm_out.linear.weight -> image_norm_out.linear.weight" in text
    assert "proj_out.weight -> image_proj_out.weight" in text

    mapped = dict(report.mapped)
    assert mapped["norm_out.linear.weight"] == "image_norm_out.linear.weight"
    assert mapped["proj_out.bias"] == "image_proj_out.bias"
    assert (
        mapped["time_text_embed.timestep_embedder.linear_1.weight"]
        == "time_text_embed.timestep_embedder.linear_1.weight"
    )
    state = transformer.state_dict()
    for src, dst in report.mapped:
        assert torch.equal(state[dst], source[src]), src

    dropped = {d.split(":")[0] for d in report.dropped}
    assert dropped == {f"time_text_embed.text_embedder.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")} | {
        "transformer_blocks.2.norm1_context.linear.weight",
        "transformer_blocks.2.norm1_context.linear.bias",
    }

    # new = what UniAlignment has and SD3 lacks (per the two reference key lists) + the projectors
    ours = generic(tsv_keys("unialignment_sd3m_transformer_keys.tsv"), 23)
    sd3 = {
        k.replace("norm_out.", "image_norm_out.", 1)
        if k.startswith("norm_out.")
        else k.replace("proj_out.", "image_proj_out.", 1)
        if k.startswith("proj_out.")
        else k
        for k in generic(tsv_keys("sd3_medium_transformer_keys.tsv"), 23)
    }
    expected_new = (ours - sd3) | {
        "transformer_blocks.LAST.norm1_context.linear.weight",
        "transformer_blocks.LAST.norm1_context.linear.bias",
    }
    assert generic(report.new, 2) == expected_new
    assert {
        "text_proj_out.weight",
        "null_image_embd",
        "transformer_blocks.2.attn.to_add_out.weight",
        "transformer_blocks.2.ff_context.net.0.proj.weight",
        "siglip_adapter_img.fc.0.weight",
    } <= set(report.new)
    assert transformer.config.vocab_size == 32100 and transformer.config.fp16_time_projection is False
    assert bundle.mask_id == 32099

    # one training step from this start: every loss term is finite, the fresh text head gets gradients
    cfg = type("C", (), {"data": type("D", (), {"text_length": 16, "cache_dir": None, "prompt_padding": "training"})})()
    enc = Encoders(bundle, torch.device("cpu"), torch.float32, torch.float32, cfg)
    module = TrainModule(transformer)
    ids = bundle.tokenize(["a red square"] * 2, 16)
    latents = torch.randn(2, 16, 16, 16)
    from train.losses import Prepared

    batch = Prepared(
        target=latents,
        conditions=[],
        prompt_context=enc.encode_ids(ids),
        null_context=enc.null_context,
        understand=latents,
        ids=ids,
        maskable=torch.ones_like(ids, dtype=torch.bool),
        not_pad=torch.ones_like(ids, dtype=torch.bool),
        caption_valid=torch.ones(2, dtype=torch.bool),
        sample_valid=torch.ones(2, dtype=torch.bool),
        teacher_image=torch.randn(2, 24),
        teacher_text=torch.randn(2, 24),
    )
    total, logged = compute_losses(
        module, batch, SampleRNG(0, 0, [0, 1], 2), LossConfig(), enc.encode_ids, bundle.mask_id, Reducer(), block=2
    )
    total.backward()
    assert all(torch.isfinite(v) and v > 0 for k, v in logged.items())
    assert transformer.text_proj_out.weight.grad.abs().sum() > 0
    assert transformer.time_text_embed.timestep_embedder.linear_1.weight.grad.abs().sum() > 0


def test_unknown_start_is_a_clear_error(tmp_path):
    from unialign_core import CheckpointError

    with pytest.raises(CheckpointError, match="not found"):
        load_start(InitConfig(path=str(tmp_path / "nothing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a model folder"):
        load_start(InitConfig(path=str(tmp_path / "empty")))
