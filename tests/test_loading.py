"""Every checkpoint format loads to the same model, and every bad file gets one clear error."""

import inspect
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import unialign_core.loader as loader
from tiny_models import (
    GOLDEN,
    REFERENCE,
    copy_tree,
    golden_model,
    golden_vectors,
    with_json_entry,
    with_metadata,
    write_single_file,
    write_t5_file,
    write_vae_file,
)
from unialign_core import (
    CheckpointError,
    load_mask_embedding,
    load_model,
    load_text_encoder,
    load_vae,
    save_single_file,
)
from unialign_core.single_file import FORMAT

MASK_ID = 32099


def same_outputs(model, reference=None, atol=1e-6, t5_atol=1e-5):
    """Transformer + T5 outputs of `model` agree with the golden model."""
    reference = reference or golden_model()
    v = golden_vectors()
    ids = reference.tokenize(["a red cube"], 16)
    with torch.no_grad():
        a = model.transformer(v["t2i.latents"], v["t2i.context"], v["t2i.timestep"])
        b = reference.transformer(v["t2i.latents"], v["t2i.context"], v["t2i.timestep"])
        assert torch.allclose(a.velocity, b.velocity, atol=atol)
        assert torch.allclose(a.text_logits, b.text_logits, atol=atol)
        assert torch.allclose(model.encode_ids(ids), reference.encode_ids(ids), atol=t5_atol)


# ---- formats ---------------------------------------------------------------------------------


def test_upstream_folder_loads_every_component():
    model = golden_model()
    assert model.mask_id == MASK_ID
    assert model.transformer.config.fp16_time_projection is True
    assert not hasattr(model.transformer, "siglip_adapter_img")  # training-only, not allocated
    assert model.scheduler_config["shift"] == 3.0
    assert model.pixel_multiple == 4  # tiny VAE downsamples x2, patch 2


def test_unialignment_folder_with_training_projectors_loads_without_them(tmp_path):
    folder = copy_tree(GOLDEN, tmp_path / "uni")
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    for side in ("img", "text"):
        state[f"siglip_adapter_{side}.fc.0.weight"] = torch.zeros(2048, 1536)
        state[f"siglip_adapter_{side}.fc.2.weight"] = torch.zeros(3584, 2048)
    save_file(state, str(weights))
    model = load_model(str(folder))
    assert not any(k.startswith("siglip") for k in model.transformer.state_dict())
    same_outputs(model)


def test_dualdiffusion_folder_turns_fp16_rounding_off(tmp_path):
    folder = copy_tree(GOLDEN, tmp_path / "dual")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DualDiffSD3Pipeline"}))
    assert load_model(str(folder)).transformer.config.fp16_time_projection is False


def test_sharded_transformer_folder_loads(tmp_path):
    folder = copy_tree(GOLDEN, tmp_path / "sharded")
    tdir = folder / "transformer"
    state = load_file(str(tdir / "diffusion_pytorch_model.safetensors"))
    (tdir / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(tdir / name))
        weight_map.update({k: name for k in part})
    (tdir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    same_outputs(load_model(str(folder)))


def test_single_file_round_trip_is_exact(tmp_path):
    path = write_single_file(tmp_path / "model.safetensors", bundle=True)
    model = load_model(str(path))
    same_outputs(model, atol=0)
    assert model.mask_id == MASK_ID
    assert model.tokenizer("a red cube")["input_ids"] == golden_model().tokenizer("a red cube")["input_ids"]
    assert model.scheduler_config["shift"] == 3.0


def test_single_file_with_comfyui_t5_vae_and_tokenizer_files(tmp_path):
    """The full-size path: the file holds the transformer; T5 and VAE come from ComfyUI's folders."""
    path = write_single_file(tmp_path / "model.safetensors")
    t5 = write_t5_file(tmp_path / "t5xxl_fp16.safetensors", torch.float16)
    vae = write_vae_file(tmp_path / "sd3_vae.safetensors")
    with pytest.raises(CheckpointError, match="no text encoder"):
        load_model(str(path))
    model = load_model(str(path), text_encoder=str(t5), vae=str(vae), tokenizer=str(GOLDEN / "tokenizer"))
    assert model.text_encoder.shared.weight.dtype == torch.float32
    same_outputs(model, atol=1e-6, t5_atol=5e-3)  # the T5 file holds fp16-rounded weights


def test_fp8_t5_stays_fp8_in_memory_and_computes(tmp_path):
    fp8 = load_text_encoder(str(write_t5_file(tmp_path / "t5xxl_fp8_e4m3fn.safetensors", torch.float8_e4m3fn)))
    q = fp8.encoder.block[0].layer[0].SelfAttention.q
    assert q.weight.dtype == torch.float8_e4m3fn
    ref = golden_model()
    ids = ref.tokenize(["a red cube on a table"], 16)
    with torch.no_grad():
        out, expected = fp8(input_ids=ids)[0], ref.text_encoder(input_ids=ids)[0]
    assert out.dtype == torch.float32
    rel = (out - expected).norm() / expected.norm()
    assert rel < 0.1  # fp8 rounding, not garbage


def test_official_mask_embedding_file_loads_safely():
    emb = load_mask_embedding(str(REFERENCE / "mask_token_emb.00-of-01.pth"))
    assert emb.shape == (4096,) and emb.dtype == torch.bfloat16 and emb.device.type == "cpu"


def test_mask_embedding_goes_into_row_32099(tmp_path):
    vector = torch.linspace(-1, 1, 32)
    torch.save(vector.to(torch.bfloat16), tmp_path / "mask.pth")  # the official file's dtype
    model = load_model(str(GOLDEN), mask_embedding=str(tmp_path / "mask.pth"))
    table = model.text_encoder.shared.weight
    assert torch.allclose(table[MASK_ID], vector, atol=1e-2)
    assert torch.equal(table[MASK_ID - 1], golden_model().text_encoder.shared.weight[MASK_ID - 1])
    # The single file keeps it, and applies it to whatever T5 the user loads.
    path = write_single_file(tmp_path / "m.safetensors", mask_embedding=str(tmp_path / "mask.pth"), bundle=True)
    assert torch.allclose(load_model(str(path)).text_encoder.shared.weight[MASK_ID], vector, atol=1e-2)


def test_mask_file_in_model_folder_is_found(tmp_path):
    folder = copy_tree(GOLDEN, tmp_path / "m")
    (folder / "checkpoint").mkdir()
    torch.save(torch.ones(32), folder / "checkpoint" / "mask_token_emb.00-of-01.pth")
    assert torch.equal(load_model(str(folder)).text_encoder.shared.weight[MASK_ID], torch.ones(32))


def test_without_any_mask_file_the_text_encoders_own_row_is_kept():
    own = load_file(str(GOLDEN / "text_encoder" / "model.safetensors"))["shared.weight"][MASK_ID]
    assert torch.equal(golden_model().text_encoder.shared.weight[MASK_ID], own)
    assert golden_model().mask_embedding is None


def test_vae_single_file_matches_folder(tmp_path):
    a = load_vae(str(write_vae_file(tmp_path / "vae.safetensors")))
    b = golden_model().vae
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(a.encode(x).latent_dist.mean, b.encode(x).latent_dist.mean)


# ---- errors --------------------------------------------------------------------------------


def test_missing_model_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors: model not found"):
        load_model(str(tmp_path / "nope.safetensors"))


def test_truncated_file_is_named(tmp_path):
    path = write_single_file(tmp_path / "m.safetensors")
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut.safetensors: not a readable safetensors file"):
        load_model(str(cut))


def test_not_a_safetensors_file(tmp_path):
    bogus = tmp_path / "model.safetensors"
    bogus.write_text("this is not a model")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_model(str(bogus))


def test_file_of_another_architecture(tmp_path):
    other = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, str(other))
    with pytest.raises(CheckpointError, match="not a UniAlignment single file"):
        load_model(str(other))


def test_plain_sd3_transformer_folder_lists_missing_and_unexpected_keys(tmp_path):
    folder = copy_tree(GOLDEN, tmp_path / "sd3")
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["norm_out.linear.weight"] = state.pop("image_norm_out.linear.weight")
    del state["null_image_embd"]
    save_file(state, str(weights))
    with pytest.raises(CheckpointError) as e:
        load_model(str(folder))
    msg = str(e.value)
    assert str(weights.parent) in msg
    assert "2 missing keys" in msg and "null_image_embd" in msg and "image_norm_out.linear.weight" in msg
    assert "1 unexpected keys" in msg and "norm_out.linear.weight" in msg


def test_wrong_shapes_are_listed(tmp_path):
    path = write_single_file(tmp_path / "m.safetensors", bundle=True)
    state = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    state["context_embedder.weight"] = torch.zeros(32, 64)
    save_file(state, str(path), metadata=meta)
    with pytest.raises(
        CheckpointError, match=r"1 wrong shapes.*context_embedder.weight: file \(32, 64\) vs model \(32, 32\)"
    ):
        load_model(str(path))


def test_t5_that_is_not_a_t5(tmp_path):
    bad = tmp_path / "clip_l.safetensors"
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(8, 4)}, str(bad))
    with pytest.raises(CheckpointError, match="clip_l.safetensors: not a T5 encoder"):
        load_text_encoder(str(bad))


def test_mask_embedding_of_wrong_size_is_named(tmp_path):
    with pytest.raises(
        CheckpointError,
        match="mask_token_emb.00-of-01.pth: mask embedding has size 4096 but the T5 encoder's width is 32",
    ):
        load_model(str(GOLDEN), mask_embedding=str(REFERENCE / "mask_token_emb.00-of-01.pth"))


def test_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "mask.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(CheckpointError, match="mask.pth: not a plain tensor file") as e:
        load_mask_embedding(str(path))
    # torch's own advice (retry with weights_only=False, i.e. run the file's code) is never passed on
    assert "weights_only=False" not in str(e.value) and "weights_only` set to `False" not in str(e.value)
    assert "never unpickles" in e.value.problem and "save_file(" in e.value.problem
    assert "mask.safetensors" in e.value.problem


def test_pth_files_need_torch_2_6_and_a_converted_file_needs_none(tmp_path, monkeypatch):
    """Before PyTorch 2.6 a crafted file gets past torch.load(weights_only=True) (CVE-2025-32434): .pth files are
    refused there, with how to convert them; the .safetensors conversion loads on any PyTorch."""
    folder = copy_tree(GOLDEN, tmp_path / "m")
    (folder / "checkpoint").mkdir()
    torch.save(torch.ones(32), folder / "checkpoint" / "mask_token_emb.00-of-01.pth")
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    for call in (
        lambda: load_mask_embedding(str(REFERENCE / "mask_token_emb.00-of-01.pth")),
        lambda: load_model(str(folder)),
    ):
        with pytest.raises(CheckpointError) as e:
            call()
        assert e.value.path.endswith("mask_token_emb.00-of-01.pth")
        problem = e.value.problem
        assert problem.startswith("reading .pth files needs PyTorch 2.6 or newer (this is 2.5.1)")
        assert "CVE-2025-32434" in problem and "mask_token_emb.00-of-01.safetensors" in problem
    converted = folder / "checkpoint" / "mask_token_emb.00-of-01.safetensors"
    save_file({"mask_token_emb": torch.full((32,), 2.0)}, str(converted))
    assert torch.equal(load_model(str(folder)).text_encoder.shared.weight[MASK_ID], torch.full((32,), 2.0))


def test_save_single_file_is_atomic(tmp_path, monkeypatch):
    path = write_single_file(tmp_path / "m.safetensors")
    before = path.read_bytes()
    import unialign_core.checkpoint as checkpoint

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_single_file(str(path), golden_model().transformer, scheduler_config={}, mask_id=MASK_ID)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_saved_files_get_ordinary_permissions(tmp_path):
    """safetensors creates owner-only files; an exported model must be readable like any file the user makes."""
    old = os.umask(0o022)
    try:
        path = write_single_file(tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_converter_cli_writes_header(tmp_path):
    from safetensors import safe_open

    from unialign_core.convert import main

    out = tmp_path / "uni.safetensors"
    assert main([str(GOLDEN), str(out), "--dtype", "bf16"]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("image_proj_out.weight").dtype == torch.bfloat16
        assert not any(k.startswith(("text_encoder.", "vae.", "siglip")) for k in f.keys())
    assert meta["format"] == FORMAT and meta["format_version"] == "1"
    assert json.loads(meta["model_config"])["num_layers"] == 3
    assert meta["vocab_size"] == "32100" and meta["mask_id"] == "32099"
    assert json.loads(meta["scheduler_config"])["shift"] == 3.0
    assert main([str(tmp_path / "missing"), str(tmp_path / "x.safetensors")]) == 2
    assert not (tmp_path / "x.safetensors").exists()


def test_vae_single_file_in_original_ldm_layout(tmp_path):
    from tiny_models import to_ldm_vae_keys

    state = load_file(str(GOLDEN / "vae" / "diffusion_pytorch_model.safetensors"))
    config = json.loads((GOLDEN / "vae" / "config.json").read_text())
    ldm = to_ldm_vae_keys(state, len(config["up_block_types"]))
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in ldm
    path = tmp_path / "sd3_vae.safetensors"
    save_file(ldm, str(path))
    (tmp_path / "sd3_vae.json").write_text(json.dumps(config))  # tiny sizes: the config sits beside it
    a, b = load_vae(str(path)), golden_model().vae
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(a.encode(x).latent_dist.mean, b.encode(x).latent_dist.mean)
        z = torch.randn(1, 16, 8, 8)
        assert torch.allclose(a.decode(z).sample, b.decode(z).sample)


# ---- what a file says is checked before anything is built (issue 20) ----------------------------------------


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    return write_single_file(tmp_path_factory.mktemp("tiny") / "tiny.safetensors", bundle=True)


def meta(**changes):
    return lambda source, target: with_metadata(source, target, **changes)


def entry(key, **entries):
    return lambda source, target: with_json_entry(source, target, key, **entries)


def nothing_built(monkeypatch):
    """Fail if the loader builds a transformer, T5 or VAE: a file's numbers are checked before anything is."""

    def built(*args, **kwargs):
        raise AssertionError("a model part was built before the file's metadata was checked")

    for name in ("build_transformer", "t5_from_state_dict", "vae_from_state_dict"):
        monkeypatch.setattr(loader, name, built)


# A text_length of 1e9 aborted the whole ComfyUI process at the first prompt; 4000 layers kept the loader busy 42 s.
UNBOUNDED = [
    (meta(text_length="1000000000"), "text_length is 1000000000, more than 4096, the most this pack accepts"),
    (meta(text_length="100000"), "text_length is 100000, more than 4096"),
    (meta(text_length="1" + "0" * 40), f"text_length is '1{'0' * 40}', more than 4096"),
    (entry("model_config", num_layers=4000), "model_config.num_layers is 4000, more than 64"),
    (entry("model_config", num_attention_heads=4096), "model_config.num_attention_heads is 4096, more than 256"),
    (entry("model_config", attention_head_dim=2048), "model_config.attention_head_dim is 2048, more than 512"),
    (entry("model_config", joint_attention_dim=10**6), "model_config.joint_attention_dim is 1000000, more than 16384"),
    (entry("model_config", pos_embed_max_size=10**5), "model_config.pos_embed_max_size is 100000, more than 1024"),
    (entry("model_config", sample_size=10**6), "model_config.sample_size is 1000000, more than 4096"),
    (entry("model_config", vocab_size=10**9), "model_config.vocab_size is 1000000000, more than 262144"),
    (entry("model_config", patch_size=0), "model_config.patch_size is 0, less than 1"),
    (entry("model_config", num_layers=3.5), "model_config.num_layers is 3.5, expected a whole number from 1 to 64"),
    (entry("text_encoder_config", num_layers=4000), "text_encoder_config.num_layers is 4000, more than 64"),
    (entry("text_encoder_config", d_model=10**6), "text_encoder_config.d_model is 1000000, more than 16384"),
    (entry("text_encoder_config", vocab_size=10**9), "text_encoder_config.vocab_size is 1000000000, more than 262144"),
    (entry("vae_config", block_out_channels=[8] * 100), "vae_config.block_out_channels is [8, 8,"),
    (entry("vae_config", layers_per_block=1000), "vae_config.layers_per_block is 1000, more than 16"),
    (entry("scheduler_config", num_train_timesteps=10**9), "scheduler_config.num_train_timesteps is 1000000000"),
    (meta(mask_id="9" * 30), f"mask_id is '{'9' * 30}', more than 262143"),
    (meta(mask_id="40000"), "mask_id is 40000, but model_config.vocab_size is 32100"),
    (
        meta(mask_embedding={"dtype": "float32", "values": [0.5] * 20000}),
        "metadata mask_embedding holds 20000 values, expected a list of 1 to 16384 numbers",
    ),
]


@pytest.mark.parametrize("change, message", UNBOUNDED, ids=lambda x: x if isinstance(x, str) else "")
def test_every_number_a_file_gives_is_bounded_before_anything_is_built(
    tiny_file, tmp_path, monkeypatch, change, message
):
    path = change(tiny_file, tmp_path / "bad.safetensors")
    nothing_built(monkeypatch)
    with pytest.raises(CheckpointError) as e:
        load_model(str(path))
    assert e.value.path == str(path) and message in e.value.problem, e.value.problem
    if "more than" in message or "less than" in message:
        assert "the file is damaged or is not a model this pack reads" in e.value.problem


# Malformed metadata gave raw Python text ("unexpected keyword argument 'foo'") naming neither file nor fix; a bad
# scheduler_config failed only when sampling.
MALFORMED = [
    (
        entry("model_config", foo=1),
        "unknown transformer config entries ['foo'] in model_config; the transformer takes vocab_size, sample_size,",
    ),
    (
        meta(model_config=[3, 32]),
        "metadata model_config must be a JSON object of the transformer's settings, found a list",
    ),
    (meta(model_config="{not json"), "metadata model_config is not valid JSON"),
    (
        entry("model_config", fp16_time_projection="yes"),
        "model_config.fp16_time_projection is 'yes', expected true or false",
    ),
    (
        entry("model_config", caption_projection_dim=48),
        "model_config.caption_projection_dim is 48, but the blocks are 2 x 16",
    ),
    (
        meta(mask_embedding={"dtype": "int64", "values": [1] * 32}),
        "metadata mask_embedding has dtype 'int64', expected one of float32, float16, bfloat16",
    ),
    (meta(mask_embedding={"dtype": "float32", "values": "abc"}), "metadata mask_embedding holds str values"),
    (meta(mask_embedding=[1, 2]), 'metadata mask_embedding must be a JSON object {"dtype": ..., "values": [...]}'),
    (meta(tokenizer="{broken"), "metadata tokenizer is not a valid tokenizer.json"),
    (meta(tokenizer_special={"eos_token": "<nope>"}), "tokenizer_special eos_token '<nope>' is not in the bundled"),
    (meta(tokenizer_special={"bos": 3}), "metadata tokenizer_special has bos: 3; expected token strings for eos_token"),
    (entry("vae_config", foo=1), "unknown VAE config entries ['foo'] in vae_config; the VAE takes in_channels,"),
    (meta(vae_config="[1]"), "metadata vae_config must be a JSON object of the VAE's settings, found a list"),
    (
        entry("vae_config", block_out_channels="abc"),
        "vae_config.block_out_channels is 'abc', expected a list of 1 to 8",
    ),
    (
        entry("vae_config", down_block_types=["DownEncoderBlock2D"]),
        "vae_config.down_block_types is ['DownEncoderBlock2D'], expected a list of 2 block names",
    ),
    (entry("vae_config", scaling_factor=float("nan")), "vae_config.scaling_factor is nan, expected a number"),
    (entry("text_encoder_config", feed_forward_proj="gated-gelu-x"), "text_encoder_config is not a usable T5 config"),
    (entry("scheduler_config", shift="fast"), "scheduler_config.shift is 'fast', expected a number from 0.001 to 1000"),
    (
        entry("scheduler_config", use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=256),
        "scheduler_config.base_image_seq_len equals max_image_seq_len with dynamic shifting on",
    ),
    (meta(scheduler_config="3"), "metadata scheduler_config must be a JSON object of the scheduler's settings"),
]


@pytest.mark.parametrize("change, message", MALFORMED, ids=lambda x: x[:40] if isinstance(x, str) else "")
def test_malformed_metadata_names_the_file_the_entry_and_what_is_expected(tiny_file, tmp_path, change, message):
    path = change(tiny_file, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_model(str(path))
    assert e.value.path == str(path) and message in e.value.problem, e.value.problem


def test_upstream_folder_configs_are_checked_at_load(tmp_path):
    """The same checks for an upstream folder's config.json files (transformer, scheduler, T5, VAE, tokenizer)."""
    folder = copy_tree(GOLDEN, tmp_path / "m")

    def edit(relative, **entries):
        path = folder / relative
        original = path.read_text()
        path.write_text(json.dumps(dict(json.loads(original), **entries)))
        return path, original

    cases = [
        ("transformer/config.json", dict(num_layers=4000), "num_layers is 4000, more than 64"),
        ("transformer/config.json", dict(foo=1), "unknown transformer config entries ['foo']; the transformer takes"),
        ("scheduler/scheduler_config.json", dict(num_train_timesteps=10**9), "num_train_timesteps is 1000000000"),
        ("scheduler/scheduler_config.json", dict(shift=None, base_shift="x"), "base_shift is 'x', expected a number"),
        ("text_encoder/config.json", dict(num_heads=10**5), "num_heads is 100000, more than 256"),
        ("vae/config.json", dict(latent_channels=10**4), "latent_channels is 10000, more than 256"),
        ("vae/config.json", dict(foo=1), "unknown VAE config entries ['foo']; the VAE takes"),
    ]
    for relative, entries, message in cases:
        path, original = edit(relative, **entries)
        with pytest.raises(CheckpointError) as e:
            load_model(str(folder))
        assert e.value.path == str(path) and message in e.value.problem, (relative, e.value.problem)
        path.write_text(original)
    (folder / "tokenizer" / "tokenizer.json").write_text("{broken")
    with pytest.raises(CheckpointError) as e:
        load_model(str(folder))
    assert e.value.path == str(folder / "tokenizer") and e.value.problem.startswith("not a readable tokenizer")


def test_a_t5_file_whose_tensor_names_claim_4000_layers_is_refused(tmp_path):
    state = load_file(str(GOLDEN / "text_encoder" / "model.safetensors"))
    state["encoder.block.3999.layer.0.layer_norm.weight"] = torch.ones(32)
    path = tmp_path / "t5.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="num_layers is 4000, more than 64") as e:
        load_text_encoder(str(path))
    assert e.value.path == str(path)


def test_the_bounds_admit_the_released_model():
    """24 layers, 24 heads x 64, joint_attention_dim 4096, pos_embed_max_size 192, vocab 32100, text_length 256;
    T5-XXL; SD3's VAE and scheduler."""
    from transformers import T5Config

    from unialign_core.transformer import UniAlignTransformer
    from unialign_core.vae import SD3_VAE_CONFIG

    released = {k: v.default for k, v in inspect.signature(UniAlignTransformer.__init__).parameters.items()}
    released = {k: v for k, v in released.items() if k != "self"}
    assert released["num_layers"] == 24 and released["pos_embed_max_size"] == 192
    assert loader.transformer_config(dict(released, caption_projection_dim=1536), "released")["vocab_size"] == 32100
    xxl = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
    loader.check_t5_config(xxl, "t5xxl")
    loader.check_vae_config(SD3_VAE_CONFIG, "sd3_vae")
    loader.check_scheduler(json.loads((GOLDEN / "scheduler" / "scheduler_config.json").read_text()), "scheduler")
    assert loader.metadata_whole({"text_length": "256"}, "text_length", "released") == 256
