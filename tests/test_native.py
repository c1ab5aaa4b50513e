"""The native path (nodes/native.py): UniAlignment as a ComfyUI MODEL, run by ComfyUI's own samplers, against the
all-in-one modes on the same noise.

In process, on a real ComfyUI 0.3.x: COMFYUI_0364_DIR names its folder (e.g. /work/comfyui_0364), and the Python
that runs these tests must have ComfyUI's requirements and this repo's (tools/setup_comfyui.sh makes one):

    COMFYUI_0364_DIR=/work/comfyui_0364 OMP_NUM_THREADS=1 /work/comfy364_venv/bin/python -m pytest tests/test_native.py

The March 2024 ComfyUI (COMFYUI_DIR, CI's) has no flow models: `test_old_comfyui_*` checks in a subprocess that the
native nodes register there and refuse with a message.

Tolerance: fp32 on the CPU, the native latents equal the modes' within PARITY_ATOL (the two loops do the same
arithmetic in a different order: CFG on x0 instead of on the velocity, Euler through the derivative).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nodes_support import import_pack

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "data" / "golden" / "tiny_unialignment"
PACK = "unialign_native_pack"  # the name the pack is imported under here (ComfyUI uses its folder name)
COMFY_ENV = "COMFYUI_0364_DIR"
PARITY_ATOL = 1e-4  # max |difference| of scaled latents (they are ~N(0, 1)); measured ~1e-6 (see the report)
SIDE = 32  # pixels: the tiny VAE downsamples x2, so 16x16 latents, 64 image tokens
STEPS = 4
SEED = 7
PROMPT = "a red cube on a wooden table"
NEGATIVE = "blurry"
INSTRUCTION = "make the cube blue"


def _comfy_dir():
    value = os.environ.get(COMFY_ENV)
    if not value:
        pytest.skip(f"{COMFY_ENV} is not set: point it at a ComfyUI 0.3.x folder (tools/setup_comfyui.sh)")
    path = Path(value)
    if not (path / "comfy" / "model_sampling.py").is_file():
        pytest.skip(f"{COMFY_ENV}={value} is not a ComfyUI folder")
    return path


@pytest.fixture(scope="module")
def comfy():
    """ComfyUI imported in this process (CPU), and the pack imported as a custom-node package."""
    path = _comfy_dir()
    torch.set_num_threads(1)
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    try:
        import comfy.cli_args
    except ImportError as e:  # not ComfyUI's requirements in this Python
        pytest.skip(f"ComfyUI at {path} does not import in this Python ({e}); run tools/setup_comfyui.sh")
    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (after --cpu)
    import comfy.sample
    import comfy.samplers

    import nodes as comfy_nodes  # ComfyUI's nodes.py

    if not hasattr(comfy.model_sampling, "ModelSamplingDiscreteFlow"):
        pytest.skip(f"the ComfyUI at {path} has no flow models (older than mid 2024)")
    import_pack(PACK)
    return comfy_nodes


def pack(name):
    return sys.modules[f"{PACK}.{name}"]


@pytest.fixture(scope="module")
def handle(comfy):
    cache = pack("nodes.model_cache")
    return cache.load_handle("tiny", str(GOLDEN), None, None, torch.float32)


@pytest.fixture(scope="module")
def lora_handle(handle, tmp_path_factory):
    sys.path.insert(0, str(REPO / "tests"))
    from nodes_support import write_tiny_lora

    path = write_tiny_lora(tmp_path_factory.mktemp("lora") / "tiny_lora.safetensors")
    return pack("nodes.lora_patches").with_lora(handle, "tiny_lora", str(path), 1.0)


def native_model(handle):
    return pack("nodes.native").UniAlignNativeModel().convert(handle)[0]


def encode(handle, text):
    out = pack("nodes.native").UniAlignNativeTextEncode().encode(handle, text)
    return out["result"][0], out["ui"]["text"]


def ksampler(comfy_nodes, model, positive, negative, latent, seed=SEED, scheduler="normal", cfg=5.0):
    (out,) = comfy_nodes.KSampler().sample(
        model, seed, STEPS, cfg, "euler", scheduler, positive, negative, latent, denoise=1.0
    )
    return out["samples"]


def mode_latents(handle, mode, *args, **kwargs):
    """The all-in-one path: the handle's weights loaded (with its LoRAs), then the core mode."""
    model = handle.activate(text_encoder_each_step=False)
    return mode(model, *args, **kwargs).latents


def scaled(handle, raw):
    return handle.model.scale_latents(raw.float())


def source_image():
    g = torch.Generator().manual_seed(11)
    return torch.rand(1, SIDE, SIDE, 3, generator=g)  # a ComfyUI IMAGE


def test_nodes_register_and_understand_takes_the_loader_output(comfy):
    mappings = sys.modules[PACK].NODE_CLASS_MAPPINGS
    for name in ("UniAlignNativeModel", "UniAlignNativeTextEncode", "UniAlignNativeImageConditioning",
                 "UniAlignNativeSigmas", "UniAlignNativeNoise", "UniAlignNativeVAE"):  # fmt: skip
        assert name in mappings
    assert mappings["UniAlignUnderstand"].INPUT_TYPES()["required"]["model"][0] == "UNIALIGN_MODEL"
    assert mappings["UniAlignNativeModel"].INPUT_TYPES()["required"]["model"][0] == "UNIALIGN_MODEL"
    assert mappings["UniAlignNativeModel"].RETURN_TYPES == ("MODEL",)


def test_the_model_is_a_flow_model_in_the_sd3_latent_format(comfy, handle):
    import comfy.latent_formats
    import comfy.model_base

    model = native_model(handle)
    base = model.model
    assert isinstance(base, comfy.model_base.BaseModel)
    assert base.model_type == comfy.model_base.ModelType.FLOW
    assert isinstance(base.latent_format, comfy.latent_formats.SD3)
    assert base.latent_format.latent_channels == 16
    assert (base.latent_format.scale_factor, base.latent_format.shift_factor) == (1.5305, 0.0609)
    sampling = model.get_model_object("model_sampling")
    assert sampling.shift == 3.0 and sampling.multiplier == 1000
    # the same module the UNIALIGN_MODEL's patcher manages: ComfyUI sees clones of one model
    assert base is handle.patcher.model and model.is_clone(handle.patcher)
    with pytest.raises(ValueError, match="cannot save a UniAlignment MODEL"):
        base.state_dict_for_saving()  # ModelSave / CheckpointSave: refused with the way to save it


def test_sigmas_match_the_modes_and_the_normal_scheduler(comfy, handle):
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    import comfy.samplers

    core = pack("unialign_core")
    native = pack("nodes.native")
    model = native_model(handle)
    for shift, m in ((3.0, model), (5.0, ModelSamplingSD3().patch(model, 5.0)[0])):
        (ours,) = native.UniAlignNativeSigmas().sigmas(m, 28)
        config = dict(handle.model.scheduler_config, shift=shift)
        assert torch.equal(ours, core.flow_sampler.flow_sigmas(config, 28, 64))
        normal = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "normal", 28)
        assert (normal - ours).abs().max() < 1e-6, (shift, normal, ours)


def test_text_encode_is_the_modes_encoding_with_its_notes(comfy, handle):
    conditioning, notes = encode(handle, PROMPT)
    (states, options), = conditioning  # fmt: skip
    expected = handle.model.encode_prompts([PROMPT])
    assert torch.equal(states, expected.float().cpu()) and options == {}
    assert notes == []
    _, notes = encode(handle, "word " * 400)
    assert len(notes) == 1 and "were cut" in notes[0] and notes[0].startswith("text: ")


def test_ksampler_text_to_image_equals_the_mode(comfy, handle):
    core = pack("unialign_core")
    model = native_model(handle)
    positive, _ = encode(handle, PROMPT)
    negative, _ = encode(handle, NEGATIVE)
    latent = {"samples": torch.zeros(1, 16, SIDE // 2, SIDE // 2)}
    native = ksampler(comfy, model, positive, negative, latent)
    ours = mode_latents(handle, core.text_to_image, PROMPT, negative_prompt=NEGATIVE, width=SIDE, height=SIDE,
                        steps=STEPS, guidance=5.0, seed=SEED)  # fmt: skip
    diff = (scaled(handle, native) - ours).abs().max().item()
    print(f"text-to-image parity: max |diff| {diff:.3g}")
    assert diff < PARITY_ATOL
    # guidance 1 (no CFG) too, and a batch of 2 (KSampler's noise for a batch is the modes' too)
    latent2 = {"samples": torch.zeros(2, 16, SIDE // 2, SIDE // 2)}
    native = ksampler(comfy, model, positive, negative, latent2, cfg=1.0)
    ours = mode_latents(handle, core.text_to_image, PROMPT, width=SIDE, height=SIDE, steps=STEPS, guidance=1.0,
                        seed=SEED, num_images=2)  # fmt: skip
    assert (scaled(handle, native) - ours).abs().max().item() < PARITY_ATOL


def test_other_schedulers_differ_from_the_modes_grid(comfy, handle):
    """simple / sgm_uniform are other grids (documented); they run, and differ a little."""
    core = pack("unialign_core")
    model = native_model(handle)
    positive, _ = encode(handle, PROMPT)
    negative, _ = encode(handle, NEGATIVE)
    latent = {"samples": torch.zeros(1, 16, SIDE // 2, SIDE // 2)}
    ours = mode_latents(handle, core.text_to_image, PROMPT, negative_prompt=NEGATIVE, width=SIDE, height=SIDE,
                        steps=STEPS, guidance=5.0, seed=SEED)  # fmt: skip
    for scheduler in ("simple", "sgm_uniform"):
        native = scaled(handle, ksampler(comfy, model, positive, negative, latent, scheduler=scheduler))
        diff = (native - ours).abs().max().item()
        print(f"{scheduler}: max |diff| {diff:.3g}")
        assert torch.isfinite(native).all() and diff > PARITY_ATOL


def _edit_inputs(comfy, handle):
    native = pack("nodes.native")
    positive, _ = encode(handle, INSTRUCTION)
    negative, _ = encode(handle, NEGATIVE)
    image = source_image()
    pos, neg, neg_plain, latent = native.UniAlignNativeImageConditioning().apply(
        handle, positive, negative, image, SEED
    )
    # the noise `edit` draws: after the source's VAE sample, from the same generator
    core_native = pack("unialign_core.native")
    model = handle.activate(text_encoder_each_step=False)
    pixels = image.movedim(-1, 1)
    (source,), generator = core_native.condition_latents(model, [pixels], SEED)
    noise = core_native.edit_noise(model, source, generator)
    return pos, neg, neg_plain, latent, noise, pixels


def test_ksampler_edit_equals_the_mode(comfy, handle):
    import comfy.sample

    core = pack("unialign_core")
    model = native_model(handle)
    pos, neg, neg_plain, latent, noise, pixels = _edit_inputs(comfy, handle)
    assert len(pos[0][1]["reference_latents"]) == 1 and "reference_latents" not in neg_plain[0][1]
    assert latent["samples"].shape == (1, 16, SIDE // 2, SIDE // 2)
    native = comfy.sample.sample(model, noise, STEPS, 5.0, "euler", "normal", pos, neg, latent["samples"], seed=SEED)
    ours = mode_latents(handle, core.edit, pixels, INSTRUCTION, negative_prompt=NEGATIVE, steps=STEPS, guidance=5.0,
                        seed=SEED)  # fmt: skip
    diff = (scaled(handle, native) - ours).abs().max().item()
    print(f"edit parity: max |diff| {diff:.3g}")
    assert diff < PARITY_ATOL
    # core's ReferenceLatent with the same latent gives the same conditioning
    from comfy_extras.nodes_edit_model import ReferenceLatent

    raw = pos[0][1]["reference_latents"][0]
    positive, _ = encode(handle, INSTRUCTION)
    negative, _ = encode(handle, NEGATIVE)
    core_pos = ReferenceLatent.execute(positive, {"samples": raw}).args[0]
    core_neg = ReferenceLatent.execute(negative, {"samples": raw}).args[0]
    again = comfy.sample.sample(model, noise, STEPS, 5.0, "euler", "normal", core_pos, core_neg, latent["samples"],
                                seed=SEED)  # fmt: skip
    assert torch.equal(again, native)


def test_dual_cfg_guider_is_edits_image_guidance(comfy, handle):
    from comfy_extras.nodes_custom_sampler import DualCFGGuider, SamplerCustomAdvanced

    import comfy.samplers

    core = pack("unialign_core")
    model = native_model(handle)
    pos, neg, neg_plain, latent, noise, pixels = _edit_inputs(comfy, handle)
    (guider,) = DualCFGGuider().get_guider(model, pos, neg, neg_plain, 5.0, 1.5, "regular")
    (sigmas,) = pack("nodes.native").UniAlignNativeSigmas().sigmas(model, STEPS)
    sampler = comfy.samplers.sampler_object("euler")
    # the same seed's noise, as UniAlign Edit draws it (after the source's VAE sample)
    (seeded,) = pack("nodes.native").UniAlignNativeNoise().noise(SEED, pos)
    assert torch.equal(seeded.generate_noise(latent), noise)
    out, _ = SamplerCustomAdvanced().sample(seeded, guider, sampler, sigmas, latent)
    ours = mode_latents(handle, core.edit, pixels, INSTRUCTION, negative_prompt=NEGATIVE, steps=STEPS, guidance=5.0,
                        image_guidance=1.5, seed=SEED)  # fmt: skip
    diff = (scaled(handle, out["samples"]) - ours).abs().max().item()
    print(f"edit + image guidance parity: max |diff| {diff:.3g}")
    assert diff < PARITY_ATOL


def test_compose_references(comfy, handle):
    import comfy.sample

    core = pack("unialign_core")
    native = pack("nodes.native")
    core_native = pack("unialign_core.native")
    model = native_model(handle)
    positive, _ = encode(handle, PROMPT)
    negative, _ = encode(handle, NEGATIVE)
    g = torch.Generator().manual_seed(5)
    refs = [torch.rand(1, SIDE, 24, 3, generator=g), torch.rand(1, 16, SIDE, 3, generator=g)]
    pos, neg, _, _ = native.UniAlignNativeImageConditioning().apply(handle, positive, negative, refs[0], SEED,
                                                                    image_2=refs[1])  # fmt: skip
    assert len(pos[0][1]["reference_latents"]) == 2
    pixels = [r.movedim(-1, 1) for r in refs]
    _, generator = core_native.condition_latents(handle.activate(False), pixels, SEED)
    noise = torch.randn((1, 16, SIDE // 2, SIDE // 2), generator=generator)
    latent = torch.zeros(1, 16, SIDE // 2, SIDE // 2)
    (seeded,) = native.UniAlignNativeNoise().noise(SEED, pos)
    assert torch.equal(seeded.generate_noise({"samples": latent}), noise)
    out = comfy.sample.sample(model, noise, STEPS, 5.0, "euler", "normal", pos, neg, latent, seed=SEED)
    ours = mode_latents(handle, core.compose, pixels, PROMPT, negative_prompt=NEGATIVE, width=SIDE, height=SIDE,
                        steps=STEPS, guidance=5.0, seed=SEED)  # fmt: skip
    assert (scaled(handle, out) - ours).abs().max().item() < PARITY_ATOL


def test_loras_carry_over_and_are_never_applied_twice(comfy, handle, lora_handle):
    core = pack("unialign_core")
    positive, _ = encode(handle, PROMPT)
    negative, _ = encode(handle, NEGATIVE)
    latent = {"samples": torch.zeros(1, 16, SIDE // 2, SIDE // 2)}
    kwargs = dict(negative_prompt=NEGATIVE, width=SIDE, height=SIDE, steps=STEPS, guidance=5.0, seed=SEED)
    with_lora = scaled(handle, ksampler(comfy, native_model(lora_handle), positive, negative, latent))
    base = scaled(handle, ksampler(comfy, native_model(handle), positive, negative, latent))
    assert (with_lora - base).abs().max() > 1e-2  # the LoRA changes the result
    # interleaved with the all-in-one path on the same weights: every result as alone
    for _ in range(2):
        assert (mode_latents(lora_handle, core.text_to_image, PROMPT, **kwargs) - with_lora).abs().max() < PARITY_ATOL
        native = scaled(handle, ksampler(comfy, native_model(lora_handle), positive, negative, latent))
        assert (native - with_lora).abs().max() < PARITY_ATOL
        assert (mode_latents(handle, core.text_to_image, PROMPT, **kwargs) - base).abs().max() < PARITY_ATOL
        native = scaled(handle, ksampler(comfy, native_model(handle), positive, negative, latent))
        assert (native - base).abs().max() < PARITY_ATOL


OUR_LORA = "native_ours.safetensors"  # our trainer's format (unialign_core.save_lora: lora_A/lora_B + alpha)
DIFFUSERS_LORA = "native_diffusers.safetensors"  # diffusers/PEFT SD3 keys, no alpha (scale 1)


def write_diffusers_lora(path, transformer):
    """A diffusers-format SD3 LoRA (`transformer.<module>.lora_A.weight` / `.lora_B.weight`, no alpha) on layers
    other than the tiny LoRA's: attention, the context stream and a feed-forward."""
    from safetensors.torch import save_file

    params = dict(transformer.named_parameters())
    g = torch.Generator().manual_seed(9)
    tensors = {}
    for module in ("transformer_blocks.0.attn.to_k", "transformer_blocks.1.attn.add_q_proj",
                   "transformer_blocks.2.ff.net.2"):  # fmt: skip
        out, inner = params[f"{module}.weight"].shape
        tensors[f"transformer.{module}.lora_A.weight"] = torch.randn(4, inner, generator=g) * 0.3
        tensors[f"transformer.{module}.lora_B.weight"] = torch.randn(out, 4, generator=g) * 0.3
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def lora_folder(comfy, handle, tmp_path_factory):
    """models/loras for ComfyUI's LoraLoaderModelOnly, with our file and a diffusers-format one."""
    import folder_paths

    sys.path.insert(0, str(REPO / "tests"))
    from nodes_support import write_tiny_lora

    folder = tmp_path_factory.mktemp("native_loras")
    write_tiny_lora(folder / OUR_LORA)
    write_diffusers_lora(folder / DIFFUSERS_LORA, handle.model.transformer)
    folder_paths.add_model_folder_path("loras", str(folder))
    return folder


def lora_model_only(comfy_nodes, model, name, strength=1.0):
    return comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)[0]


def test_lora_key_map_covers_comfyui_and_diffusers_names(comfy, handle):
    import comfy.lora

    model = native_model(handle)
    keys = set(model.model.state_dict())
    weight = "diffusion_model.transformer_blocks.0.attn.to_q.weight"
    assert weight in keys and not any(k.startswith("transformer.") for k in keys)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    for name in ("diffusion_model.transformer_blocks.0.attn.to_q",  # ComfyUI's own (TrainLoraNode), generic
                 "lora_unet_transformer_blocks_0_attn_to_q",  # kohya
                 "transformer.transformer_blocks.0.attn.to_q",  # diffusers / PEFT, our trainer's
                 "base_model.model.transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_q",
                 "lora_transformer_transformer_blocks_0_attn_to_q"):  # fmt: skip
        assert key_map[name] == weight, name
    assert all(v.startswith("diffusion_model.") for v in key_map.values())  # never the VAE


@pytest.mark.parametrize("name", [OUR_LORA, DIFFUSERS_LORA])
def test_lora_loader_model_only_equals_unialign_lora(comfy, handle, lora_folder, name, caplog):
    """Core's LoraLoaderModelOnly on the native MODEL gives the latents of UniAlign LoRA + the all-in-one node."""
    core = pack("unialign_core")
    positive, _ = encode(handle, PROMPT)
    negative, _ = encode(handle, NEGATIVE)
    latent = {"samples": torch.zeros(1, 16, SIDE // 2, SIDE // 2)}
    kwargs = dict(negative_prompt=NEGATIVE, width=SIDE, height=SIDE, steps=STEPS, guidance=5.0, seed=SEED)
    with caplog.at_level("WARNING"):
        patched = lora_model_only(comfy, native_model(handle), name, 0.8)
    assert not [r for r in caplog.records if "not loaded" in r.getMessage().lower()], caplog.text
    assert len(patched.patches) == 3 and all(k.startswith("diffusion_model.") for k in patched.patches)
    native = scaled(handle, ksampler(comfy, patched, positive, negative, latent))
    via_node = pack("nodes.lora_patches").with_lora(handle, name, str(lora_folder / name), 0.8)
    allinone = mode_latents(via_node, core.text_to_image, PROMPT, **kwargs)
    diff = (native - allinone).abs().max().item()
    print(f"LoraLoaderModelOnly ({name}) vs UniAlign LoRA + all-in-one: max |diff| {diff:.3g}")
    assert diff < PARITY_ATOL
    base = mode_latents(handle, core.text_to_image, PROMPT, **kwargs)
    assert (allinone - base).abs().max() > 1e-2  # the LoRA changes the result
    # the base after it, both paths: the LoRA is gone (never left on the shared weights)
    assert (scaled(handle, ksampler(comfy, native_model(handle), positive, negative, latent)) - base).abs().max() < (
        PARITY_ATOL
    )


def test_lora_loaders_stack_and_never_apply_twice(comfy, handle, lora_folder):
    """UniAlign LoRA (ours) -> Native Model -> LoraLoaderModelOnly (diffusers) equals both through UniAlign LoRA and
    the all-in-one node, interleaved with runs of each alone; the same file through both loaders adds up twice,
    as two LoRA nodes would (the user's choice), never more."""
    core = pack("unialign_core")
    lora = pack("nodes.lora_patches")
    positive, _ = encode(handle, PROMPT)
    negative, _ = encode(handle, NEGATIVE)
    latent = {"samples": torch.zeros(1, 16, SIDE // 2, SIDE // 2)}
    kwargs = dict(negative_prompt=NEGATIVE, width=SIDE, height=SIDE, steps=STEPS, guidance=5.0, seed=SEED)
    ours = lora.with_lora(handle, OUR_LORA, str(lora_folder / OUR_LORA), 1.0)
    both = lora.with_lora(ours, DIFFUSERS_LORA, str(lora_folder / DIFFUSERS_LORA), 1.0)
    twice = lora.with_lora(ours, OUR_LORA, str(lora_folder / OUR_LORA), 1.0)
    expected_both = mode_latents(both, core.text_to_image, PROMPT, **kwargs)
    expected_twice = mode_latents(twice, core.text_to_image, PROMPT, **kwargs)
    expected_ours = mode_latents(ours, core.text_to_image, PROMPT, **kwargs)
    stacked = lora_model_only(comfy, native_model(ours), DIFFUSERS_LORA)
    doubled = lora_model_only(comfy, native_model(ours), OUR_LORA)
    cases = ((stacked, expected_both), (native_model(ours), expected_ours), (doubled, expected_twice))
    for _ in range(2):
        for model, expected in cases:
            out = scaled(handle, ksampler(comfy, model, positive, negative, latent))
            assert (out - expected).abs().max() < PARITY_ATOL
        assert (mode_latents(ours, core.text_to_image, PROMPT, **kwargs) - expected_ours).abs().max() < PARITY_ATOL
    assert (expected_twice - expected_ours).abs().max() > 1e-2


def test_comfyui_loads_and_offloads_the_model_like_any_other(comfy, handle, lora_folder):
    """ComfyUI's model management handles the MODEL (on the CPU this is its bookkeeping): load_models_gpu lists it
    in current_loaded_models, free_memory / unload_all_models remove it and undo its LoRA patches, the all-in-one
    nodes' patcher replaces it as a clone of the same model, and sampling after each gives the same latents."""
    import comfy.model_management as mm

    def entries(patcher):
        return [m for m in mm.current_loaded_models if m.model is patcher]

    positive, _ = encode(handle, PROMPT)
    negative, _ = encode(handle, NEGATIVE)
    latent = {"samples": torch.zeros(1, 16, SIDE // 2, SIDE // 2)}
    transformer = handle.model.transformer
    weight = "transformer_blocks.0.attn.to_q.weight"  # a layer the LoRA patches
    mm.unload_all_models()
    base = transformer.state_dict()[weight].clone()
    model = lora_model_only(comfy, native_model(handle), OUR_LORA)
    expected = ksampler(comfy, model, positive, negative, latent)
    assert len(entries(model)) == 1  # KSampler loaded it through load_models_gpu

    for free in (lambda: mm.unload_all_models(), lambda: mm.free_memory(1e30, mm.get_torch_device())):
        mm.load_models_gpu([model])
        (loaded,) = entries(model)
        assert loaded.model_memory() == model.model_size() > 0 and loaded.currently_used
        assert not torch.equal(transformer.state_dict()[weight], base)  # patched while loaded
        free()
        assert not entries(model) and not any(m.model.is_clone(model) for m in mm.current_loaded_models)
        assert torch.equal(transformer.state_dict()[weight], base)  # unloading restored the weights
        assert torch.equal(ksampler(comfy, model, positive, negative, latent), expected)
    # the all-in-one nodes' patcher is a clone of the same model: loading it replaces the MODEL (one copy loaded)
    handle.activate(text_encoder_each_step=False)
    assert entries(handle.patcher) and not entries(model)
    assert torch.equal(transformer.state_dict()[weight], base)
    assert torch.equal(ksampler(comfy, model, positive, negative, latent), expected)
    assert entries(model) and not entries(handle.patcher)
    mm.unload_all_models()
    assert not entries(model) and torch.equal(transformer.state_dict()[weight], base)


def test_clip_conditioning_is_refused_with_a_message(comfy, handle):
    model = native_model(handle)
    wrong = [[torch.zeros(1, 77, 4096), {}]]
    latent = {"samples": torch.zeros(1, 16, SIDE // 2, SIDE // 2)}
    with pytest.raises(ValueError, match="UniAlign Native Text Encode"):
        ksampler(comfy, model, wrong, wrong, latent)


OLD_COMFY_SCRIPT = r"""
import importlib.util, sys
comfy_dir, repo = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_dir)
import comfy.cli_args
comfy.cli_args.args.cpu = True
spec = importlib.util.spec_from_file_location("old_pack", repo + "/__init__.py", submodule_search_locations=[repo])
module = importlib.util.module_from_spec(spec)
sys.modules["old_pack"] = module
spec.loader.exec_module(module)
native = sys.modules["old_pack.nodes.native"]
assert "UniAlignNativeModel" in module.NODE_CLASS_MAPPINGS
print("SUPPORT", native.native_support())
try:
    native.UniAlignNativeModel().convert(None)
except ValueError as e:
    print("REFUSED", e)
"""


def test_old_comfyui_registers_the_native_nodes_and_refuses_clearly():
    """The March 2024 ComfyUI (CI's, COMFYUI_DIR) predates flow models: the pack imports, the native nodes
    register, and the MODEL node says why it cannot run. Runs in a subprocess with the Python running the tests
    (only one ComfyUI can be imported per process)."""
    value = os.environ.get("COMFYUI_DIR")
    if not value or not (Path(value) / "main.py").is_file():
        pytest.skip("COMFYUI_DIR is not set: the March 2024 ComfyUI (.ci/get_comfyui.sh DIR)")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", OLD_COMFY_SCRIPT, value, str(REPO)], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    if done.returncode != 0 and "ModuleNotFoundError" in done.stderr:
        pytest.skip(f"that ComfyUI does not import in this Python: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-3000:]
    support = [line for line in done.stdout.splitlines() if line.startswith(("SUPPORT", "REFUSED"))]
    if support[0] == "SUPPORT None":
        pytest.skip("this COMFYUI_DIR has flow models (not the March 2024 ComfyUI)")
    assert support[1].startswith("REFUSED model: this ComfyUI has no flow-matching models"), support
    assert "update ComfyUI" in support[1]


def server_prompt():
    """One API prompt: text-to-image and an edit, each by the native nodes (KSampler; SamplerCustomAdvanced with
    CFGGuider) and by the all-in-one node, with the same seed; every result saved as a .latent file."""
    from nodes_support import INPUT_IMAGES, TINY_MODEL

    def latent_side(pixels):  # EmptySD3LatentImage divides by 8; the tiny VAE by 2
        return pixels * 4

    return {
        "1": {"class_type": "UniAlignLoader",
              "inputs": {"model": TINY_MODEL, "text_encoder": "(from model)", "vae": "(from model)", "dtype": "fp32",
                         "weight_dtype": "default"}},
        "2": {"class_type": "UniAlignNativeModel", "inputs": {"model": ["1", 0]}},
        "3": {"class_type": "UniAlignNativeTextEncode", "inputs": {"model": ["1", 0], "text": PROMPT}},
        "4": {"class_type": "UniAlignNativeTextEncode", "inputs": {"model": ["1", 0], "text": NEGATIVE}},
        "5": {"class_type": "EmptySD3LatentImage",
              "inputs": {"width": latent_side(SIDE), "height": latent_side(SIDE), "batch_size": 1}},
        "6": {"class_type": "KSampler",
              "inputs": {"model": ["2", 0], "seed": SEED, "steps": STEPS, "cfg": 5.0, "sampler_name": "euler",
                         "scheduler": "normal", "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
                         "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "latents/native_t2i"}},
        "8": {"class_type": "UniAlignTextToImage",
              "inputs": {"model": ["1", 0], "prompt": PROMPT, "negative_prompt": NEGATIVE, "width": SIDE,
                         "height": SIDE, "steps": STEPS, "guidance": 5.0, "seed": SEED, "batch_size": 1}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 1], "filename_prefix": "latents/aio_t2i"}},
        "10": {"class_type": "LoadImage", "inputs": {"image": INPUT_IMAGES[0]}},
        "11": {"class_type": "ImageScale",
               "inputs": {"image": ["10", 0], "upscale_method": "bilinear", "width": SIDE, "height": SIDE,
                          "crop": "center"}},
        "12": {"class_type": "UniAlignNativeTextEncode", "inputs": {"model": ["1", 0], "text": INSTRUCTION}},
        "13": {"class_type": "UniAlignNativeImageConditioning",
               "inputs": {"model": ["1", 0], "positive": ["12", 0], "negative": ["4", 0], "image": ["11", 0],
                          "encode_seed": SEED}},
        "14": {"class_type": "UniAlignNativeNoise", "inputs": {"noise_seed": SEED, "conditioning": ["13", 0]}},
        "15": {"class_type": "CFGGuider",
               "inputs": {"model": ["2", 0], "positive": ["13", 0], "negative": ["13", 1], "cfg": 5.0}},
        "16": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "17": {"class_type": "UniAlignNativeSigmas", "inputs": {"model": ["2", 0], "steps": STEPS}},
        "18": {"class_type": "SamplerCustomAdvanced",
               "inputs": {"noise": ["14", 0], "guider": ["15", 0], "sampler": ["16", 0], "sigmas": ["17", 0],
                          "latent_image": ["13", 3]}},
        "19": {"class_type": "SaveLatent", "inputs": {"samples": ["18", 0], "filename_prefix": "latents/native_edit"}},
        "20": {"class_type": "UniAlignEdit",
               "inputs": {"model": ["1", 0], "image": ["11", 0], "instruction": INSTRUCTION,
                          "negative_prompt": NEGATIVE, "steps": STEPS, "guidance": 5.0, "image_guidance": 1.0,
                          "seed": SEED, "batch_size": 1}},
        "21": {"class_type": "SaveLatent", "inputs": {"samples": ["20", 1], "filename_prefix": "latents/aio_edit"}},
    }  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real ComfyUI 0.3.x server (this Python) with the pack installed, the tiny models and the input images."""
    comfy_dir = _comfy_dir()
    from comfy_server import ComfyServer
    from nodes_support import make_input_images, make_models_dir

    tmp = tmp_path_factory.mktemp("native_server")
    models = make_models_dir(tmp / "models")
    with ComfyServer(comfy_dir, REPO, models, tmp / "comfy") as server:
        make_input_images(server.base_dir / "input")
        yield server


@pytest.mark.slow
def test_server_runs_native_workflows_like_the_all_in_one_nodes(server):
    """On the server: /object_info lists the native nodes, and one prompt's native results equal the all-in-one
    nodes' for the same seed."""
    from safetensors.torch import load_file

    from nodes_support import run

    info = server.object_info()
    for name in ("UniAlignNativeModel", "UniAlignNativeTextEncode", "UniAlignNativeImageConditioning",
                 "UniAlignNativeSigmas", "UniAlignNativeNoise", "UniAlignNativeVAE"):  # fmt: skip
        assert name in info, name
        for section in ("required", "optional"):
            for key, spec in info[name]["input"].get(section, {}).items():
                assert len(spec) > 1 and len(spec[1].get("tooltip", "")) > 15, f"{name}.{key} has no tooltip"
    run(server, server_prompt(), timeout=300)
    out = server.base_dir / "output" / "latents"

    def latent(prefix):
        return load_file(str(out / f"{prefix}_00001_.latent"))["latent_tensor"].float()

    for native, allinone in (("native_t2i", "aio_t2i"), ("native_edit", "aio_edit")):
        diff = (latent(native) - latent(allinone)).abs().max().item()
        print(f"server {native} vs {allinone}: max |diff| {diff:.3g} (raw SD3 latents)")
        assert diff < PARITY_ATOL, (native, diff)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["native_ksampler", "native_edit_caption_loop"])
def test_server_runs_the_native_example_workflows(server, name):
    """workflows/8 and 9 (which the March 2024 ComfyUI of test_nodes_server.py skips): their stored widget schema
    and API twins are this server's, and each runs on the tiny model, saving SIDE x SIDE images (and a caption)."""
    import json

    import nodes_support as support
    from tools import make_api

    assert name in support.NATIVE_WORKFLOWS
    info = server.object_info()
    path = make_api.ui_path(name)
    ui = json.loads(path.read_text(encoding="utf-8"))
    live = make_api.schema_from_object_info(info, make_api.used_classes([path]))
    stored = make_api.load_schema()
    assert live == {c: stored[c] for c in live}
    make_api.check_ui(ui, live, path.name)
    assert make_api.ui_to_api(ui, live, path.name) == support.load_api(name)
    api = support.tiny_settings(support.load_api(name))
    assert support.unsupported_reason(api, info) is None
    entry = support.run(server, api, timeout=300)
    saves, texts = support.save_image_nodes(api), support.understand_nodes(api)
    for save in saves:
        files = support.output_files(server, entry, save)
        assert len(files) == 1 and support.read_pixels(files[0]).shape == (support.SIDE, support.SIDE, 3), files
    if name == "native_edit_caption_loop":
        assert len(saves) == 2 and len(texts) == 1
        text = entry["outputs"][texts[0]]["text"]
        assert len(text) == 1 and text[0].strip()
        assert support.image_source(api, texts[0]) == support.image_source(api, saves[0])  # caption of the edit
    else:
        assert len(saves) == 1 and not texts


def test_easycache_wraps_the_model_call(comfy, handle):
    """Core's EasyCache (a DIFFUSION_MODEL wrapper) sees our model calls: off at threshold 0, skipping at 3."""
    from comfy_extras.nodes_easycache import EasyCacheNode

    model = native_model(handle)
    positive, _ = encode(handle, PROMPT)
    negative, _ = encode(handle, NEGATIVE)
    latent = {"samples": torch.zeros(1, 16, SIDE // 2, SIDE // 2)}

    def run(m):
        (out,) = comfy.KSampler().sample(m, SEED, 12, 5.0, "euler", "normal", positive, negative, latent, denoise=1.0)
        return out["samples"]

    plain = run(model)
    exact = EasyCacheNode.execute(model, 0.0, 0.0, 1.0, False).args[0]
    assert torch.equal(run(exact), plain)
    cached = run(EasyCacheNode.execute(model, 3.0, 0.0, 1.0, False).args[0])
    assert torch.isfinite(cached).all() and not torch.equal(cached, plain)


def test_object_patches_of_the_diffusion_model_are_called_and_undone(comfy, handle):
    """What TorchCompileModel does (an object patch of diffusion_model) reaches the model call, and is undone."""

    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.__dict__["inner"] = inner  # not a submodule: no second set of weights
            self.calls = 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.inner(*args, **kwargs)

    model = native_model(handle)
    transformer = handle.model.transformer
    assert model.get_model_object("diffusion_model") is transformer
    keys = set(model.model.state_dict())
    positive, _ = encode(handle, PROMPT)
    negative, _ = encode(handle, NEGATIVE)
    latent = {"samples": torch.zeros(1, 16, SIDE // 2, SIDE // 2)}
    plain = ksampler(comfy, model, positive, negative, latent)
    patched = model.clone()
    counting = Counting(transformer)
    patched.add_object_patch("diffusion_model", counting)
    assert torch.equal(ksampler(comfy, patched, positive, negative, latent), plain)
    assert counting.calls == STEPS and set(model.model.state_dict()) == keys
    calls = counting.calls
    assert torch.equal(ksampler(comfy, model, positive, negative, latent), plain)
    assert counting.calls == calls and model.model.diffusion_model is transformer


def test_understand_is_unchanged_by_native_sampling_with_a_lora(comfy, handle, lora_handle):
    core = pack("unialign_core")
    image = source_image().movedim(-1, 1)

    def caption(h):
        return core.caption(h.activate(), image, answer_tokens=16, steps=4, resize="as_is")

    before = caption(lora_handle), caption(handle)
    positive, _ = encode(handle, PROMPT)
    latent = {"samples": torch.zeros(1, 16, SIDE // 2, SIDE // 2)}
    ksampler(comfy, native_model(lora_handle), positive, positive, latent)
    assert (caption(lora_handle), caption(handle)) == before


def test_the_latent_decodes_with_comfyuis_sd3_vae(comfy, handle):
    """The LATENT is SD3's: ComfyUI's VAE (built from an SD3-shaped VAE's weights, as UniAlign Native VAE builds
    it) decodes it to the images our VAE makes of the same latents. A randomly initialised full-size SD3 VAE (the
    tiny model's VAE is refused: ComfyUI builds only SD3's shape)."""
    from diffusers import AutoencoderKL

    native = pack("nodes.native")
    vae_module = pack("unialign_core.vae")
    with pytest.raises(native.InputError, match="not shaped like SD3's"):
        native.comfy_vae(handle.model.vae)
    torch.manual_seed(0)
    vae = AutoencoderKL(**vae_module.SD3_VAE_CONFIG).eval()
    comfy_vae = native.comfy_vae(vae)
    scaled_latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    raw = vae_module.unscale_latents(scaled_latents, vae.config)  # a LATENT's samples
    with torch.no_grad():
        ours = vae_module.decode(vae, scaled_latents)  # [B, 3, H, W] in 0..1
    theirs = comfy.VAEDecode().decode(comfy_vae, {"samples": raw})[0]  # IMAGE [B, H, W, 3]
    diff = (theirs.movedim(-1, 1) - ours).abs().max().item()
    print(f"ComfyUI VAE Decode vs ours: max |diff| {diff:.3g}")
    assert theirs.shape == (1, 64, 64, 3) and diff < 1e-3


def test_the_vae_node_runs_a_vae_comfyui_cannot_build(comfy, handle):
    """The tiny model's VAE (not SD3's shape): UniAlign Native VAE gives VAE Decode / VAE Encode our VAE's results."""
    native = pack("nodes.native")
    vae_module = pack("unialign_core.vae")
    (vae,) = native.UniAlignNativeVAE().vae(handle)
    assert isinstance(vae, native.OwnVAE)
    raw = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    (image,) = comfy.VAEDecode().decode(vae, {"samples": raw})
    with torch.no_grad():
        ours = vae_module.decode(handle.model.vae, handle.model.scale_latents(raw))
    assert image.shape == (2, 16, 16, 3) and torch.equal(image, ours.movedim(1, -1))
    (latent,) = comfy.VAEEncode().encode(vae, image)
    with torch.no_grad():
        mean = vae_module.posterior(handle.model.vae, image.movedim(-1, 1)).mean
    assert torch.equal(latent["samples"], mean.float())
