"""The full-size rehearsal's file writer, at a tiny size: the layouts load through the normal code paths."""

import json

import pytest
import torch
from safetensors import safe_open

from tools.rehearse import (
    load_for_modes,
    position_crop_check,
    small_spec,
    t5_linear_dtypes,
    weights_held,
    write_files,
)
from unialign_core.convert import convert
from unialign_core.loader import load_model
from unialign_core.single_file import StreamingSafetensorsWriter


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("rehearse")
    spec = small_spec()
    return spec, write_files(str(root), spec)


def _keys(path):
    with safe_open(path, "pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def test_upstream_folder_layout(written):
    spec, paths = written
    folder = paths["folder"]
    index = json.load(open(f"{folder}/transformer/diffusion_pytorch_model.safetensors.index.json"))
    assert len(paths["transformer_shards"]) >= 2 and len(set(index["weight_map"].values())) == len(
        paths["transformer_shards"]
    )
    found = {}
    for shard in paths["transformer_shards"]:
        found.update(_keys(shard))
    assert {k: s for k, (s, _) in found.items()} == dict(spec.transformer_keys)  # names and shapes as the key list
    assert {d for _, d in found.values()} == {"BF16"}
    assert any(k.startswith("siglip_adapter_img.") for k in found)  # the training-only keys are there, as released
    assert json.load(open(f"{folder}/text_encoder/model.safetensors.index.json"))["weight_map"]
    mask = torch.load(f"{folder}/checkpoint/mask_token_emb.00-of-01.pth", map_location="cpu", weights_only=True)
    assert isinstance(mask, torch.Tensor) and mask.shape == (spec.t5_config["d_model"],)


def test_comfyui_t5_files(written):
    _, paths = written
    fp8, fp16 = _keys(paths["t5_fp8"]), _keys(paths["t5_fp16"])
    assert fp8.keys() == fp16.keys() and "shared.weight" in fp8 and "encoder.embed_tokens.weight" not in fp8
    assert fp8["encoder.block.0.layer.0.SelfAttention.q.weight"][1] == "F8_E4M3"
    assert fp8["encoder.block.1.layer.1.DenseReluDense.wo.weight"][1] == "F8_E4M3"
    assert fp8["shared.weight"][1] == "F16" and fp8["encoder.final_layer_norm.weight"][1] == "F16"
    assert {d for _, d in fp16.values()} == {"F16"}


def test_converted_file_loads_like_the_loader_node_and_matches_the_folder(written, tmp_path):
    _, paths = written
    convert(paths["folder"], paths["single_file"], "bf16")
    model = load_for_modes(paths, "cpu")
    assert t5_linear_dtypes(model.text_encoder) == {"float8_e4m3fn": 14}  # 2 layers x (q k v o wi_0 wi_1 wo)
    assert {p.dtype for p in model.transformer.parameters()} == {torch.bfloat16}
    assert weights_held(model.transformer) > 0
    folder = load_model(paths["folder"], dtype=torch.bfloat16)
    a, b = model.transformer.state_dict(), folder.transformer.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(model.mask_embedding, folder.mask_embedding)
    ids = model.tokenize(["a fox"], 8)
    assert torch.isfinite(model.encode_ids(ids)).all()


def test_position_crop_of_a_non_square_image_is_the_official_one(written):
    _, paths = written
    model = load_model(paths["folder"], dtype=torch.float32)
    check = position_crop_check(model.transformer, width=512, height=768, vae_scale=model.vae_scale)
    assert check["grid"] == [48, 32] and check["matches_official"]
    assert check["max_abs_diff_vs_transposed"] > 0  # the check can tell rows from columns


def test_streaming_writer_refuses_the_wrong_order_and_leaves_no_file(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="declared order"):
        with StreamingSafetensorsWriter(str(path), [("a", torch.float32, (2,)), ("b", torch.float16, (3,))]) as w:
            w.write("b", torch.zeros(3, dtype=torch.float16))
    assert not path.exists() and not list(tmp_path.iterdir())
    with StreamingSafetensorsWriter(
        str(path), [("a", torch.float32, (2,)), ("b", torch.bfloat16, (1, 3))], {"k": "v"}
    ) as w:
        w.write("a", torch.tensor([1.0, 2.0]))
        w.write("b", torch.ones(1, 3, dtype=torch.bfloat16))
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"k": "v"} and torch.equal(f.get_tensor("a"), torch.tensor([1.0, 2.0]))
        assert f.get_tensor("b").dtype == torch.bfloat16
