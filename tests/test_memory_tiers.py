"""Memory tiers: layer operations, fp8 weight storage, partial (lowvram) loading and T5's own ModelPatcher.

The core tests need no ComfyUI. The others import the real ComfyUI of COMFYUI_DIR in this process (CPU), build
the pack's handle as the Loader does, and drive ComfyUI's own loading code; without COMFYUI_DIR they skip.
"""

import sys

import pytest
import torch
import torch.nn as nn

from nodes_support import SIDE, TINY_LORA, TINY_MODEL, import_pack, make_models_dir
from tiny_models import GOLDEN
from unialign_core import load_model, text_to_image
from unialign_core.transformer import FP8_SCOPE

FP8 = [n for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]
PROMPT = "a red circle on a blue square"


class CountingOps:
    """A stand-in for comfy.ops: a Linear that counts its calls."""

    calls = 0

    class Linear(nn.Linear):
        def forward(self, x):
            CountingOps.calls += 1
            return super().forward(x)


def _velocity(model, seed=0, text=False):
    """One velocity (and, with text=True, the text logits too, so that every layer runs)."""
    g = torch.Generator().manual_seed(seed)
    t = model.transformer
    latents = torch.randn(1, t.config.in_channels, 8, 8, generator=g).to(model.device, model.dtype)
    with torch.no_grad():
        context = model.encode_prompts([PROMPT])
        out = t(latents, context, torch.tensor([500.0], dtype=model.dtype), compute_text=text)
    return torch.cat([out.velocity.float().flatten()] + ([out.text_logits.float().flatten()] if text else []))


def _linears(module, scope=""):
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear) and n.startswith(scope)}


# ---- core: operations and fp8 storage (no ComfyUI) ------------------------------------------------


def test_operations_swap_every_linear_and_keep_keys_and_outputs():
    plain = load_model(str(GOLDEN))
    swapped = load_model(str(GOLDEN), operations=CountingOps)
    for part in ("transformer", "text_encoder"):
        a, b = getattr(plain, part), getattr(swapped, part)
        assert list(a.state_dict()) == list(b.state_dict())  # the released key list is unchanged
        assert _linears(b) and all(type(m) is CountingOps.Linear for m in _linears(b).values()), part
    CountingOps.calls = 0
    assert torch.equal(_velocity(plain), _velocity(swapped))
    assert CountingOps.calls > len(_linears(swapped.transformer))  # the swapped layers did the work


@pytest.mark.parametrize("name", FP8)
def test_fp8_block_weights_stay_fp8_and_the_velocity_stays_close(name):
    stored = getattr(torch, name)
    bf16 = load_model(str(GOLDEN), dtype=torch.bfloat16)
    fp8 = load_model(str(GOLDEN), dtype=torch.bfloat16, weight_dtype=stored)
    blocks = _linears(fp8.transformer, FP8_SCOPE)
    assert blocks and all(m.weight.dtype == stored for m in blocks.values())
    others = [p for n, p in fp8.transformer.named_parameters() if not n.startswith(FP8_SCOPE)]
    assert all(p.dtype == torch.bfloat16 for p in others)  # embedders, heads, norms: compute dtype
    assert all(m.bias is None or m.bias.dtype == torch.bfloat16 for m in blocks.values())
    assert fp8.dtype == torch.bfloat16

    def size(model):
        return sum(t.numel() * t.element_size() for t in model.transformer.state_dict().values())

    assert size(bf16) - size(fp8) == sum(m.weight.numel() for m in blocks.values())  # 1 byte each, not 2
    v_ref, v_fp8 = _velocity(bf16), _velocity(fp8)
    diff = (v_ref - v_fp8).abs().max().item()
    print(f"\n{name}: max abs velocity diff vs bf16 {diff:.4f} (velocity up to {v_ref.abs().max().item():.3f})")
    assert 0 < diff < 0.25 * v_ref.abs().max().item()  # changed (fp8 is really used), but only slightly
    text_to_image(fp8, PROMPT, width=SIDE, height=SIDE, steps=2, guidance=2.0)
    assert all(m.weight.dtype == stored for m in blocks.values())  # still fp8 after a run


# ---- ComfyUI in this process ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pack(comfyui_dir, tmp_path_factory):
    """ComfyUI's modules (CPU) and the pack, with the tiny models in the unialignment folder."""
    if str(comfyui_dir) not in sys.path:
        sys.path.append(str(comfyui_dir))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management as mm
    import folder_paths

    models = make_models_dir(tmp_path_factory.mktemp("models"))
    module = import_pack("unialign_pack_tiers")
    for name in ("unialignment", "loras"):
        folder_paths.folder_names_and_paths[name] = ([str(models / name)], {".safetensors"})
    yield module, mm
    mm.unload_all_models()


def _services(pack):
    return sys.modules[pack[0].__name__ + ".nodes.model_cache"]


def _handle(pack, dtype="fp32", weight_dtype="default"):
    loader = pack[0].NODE_CLASS_MAPPINGS["UniAlignLoader"]()
    return loader.load(TINY_MODEL, "(from model)", "(from model)", dtype, weight_dtype)[0]


def _generate(pack, handle, seed=1):
    node = pack[0].NODE_CLASS_MAPPINGS["UniAlignTextToImage"]()
    return node.generate(handle, PROMPT, "", SIDE, SIDE, 3, 3.0, seed, 1)["result"][0]


def _partial_load(patcher, budget):
    """ComfyUI's own partial (lowvram) load with a memory budget in bytes, in either ComfyUI API."""
    device = patcher.load_device
    if hasattr(patcher, "partially_load"):  # ComfyUI 0.3.x
        patcher.patch_model(device, lowvram_model_memory=budget, load_weights=True)
    else:  # March 2024
        patcher.patch_model_lowvram(device_to=device, lowvram_model_memory=budget)


def test_nodes_give_todays_output_when_everything_fits(pack):
    """The node (comfy.ops layers, two patchers) gives exactly the plain-torch model's image."""
    import nodes_support  # noqa: F401  (the models folder is made by the fixture)

    handle = _handle(pack)
    image = _generate(pack, handle)
    path = sys.modules[pack[0].__name__ + ".nodes.model_files"].resolve_model(TINY_MODEL)
    plain = load_model(path)  # torch.nn layers, as before this change
    core = text_to_image(plain, PROMPT, width=SIDE, height=SIDE, steps=3, guidance=3.0, seed=1).images
    assert torch.equal(image, core.movedim(1, -1))
    comfy_ops = sys.modules["comfy.ops"]
    assert all(isinstance(m, comfy_ops.disable_weight_init.Linear) for m in _linears(handle.model.transformer).values())


def test_partial_load_streams_part_of_the_weights_and_computes_the_same(pack, monkeypatch):
    services = _services(pack)
    mm = pack[1]
    handle = _handle(pack)
    patcher = handle.patcher
    handle.activate()
    v_full = _velocity(handle.model, text=True)
    mm.unload_all_models()

    budget = patcher.model_size() // 4
    _partial_load(patcher, budget)
    services.place_unmanaged(patcher)
    streamed = set(services.streamed_layers(patcher))
    linears = {services.TRANSFORMER_PREFIX + n for n in _linears(handle.model.transformer)}
    assert streamed and streamed < linears  # part streamed, part loaded
    comfy_ops = sys.modules["comfy.ops"]
    cast = set()
    names = {m: n for n, m in patcher.model.named_modules()}
    original = comfy_ops.disable_weight_init.Linear.forward_comfy_cast_weights

    def spy(self, *args, **kwargs):
        cast.add(names[self])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(comfy_ops.disable_weight_init.Linear, "forward_comfy_cast_weights", spy)
    v_partial = _velocity(handle.model, text=True)
    assert cast == streamed  # exactly the streamed layers cast their weights per call; the rest ran as loaded
    assert torch.equal(v_partial, v_full)
    patcher.unpatch_model(patcher.offload_device)
    assert not services.streamed_layers(patcher)  # ComfyUI restores the layers when it unloads


def test_partial_load_applies_a_lora_per_call(pack):
    services = _services(pack)
    mm = pack[1]
    if not callable(mm.load_models_gpu) or "force_full_load" not in mm.load_models_gpu.__code__.co_varnames:
        pytest.skip(
            "the March 2024 ComfyUI casts a streamed weight without a copy when the load and offload "
            "devices are the same (CPU) and then adds the LoRA to it in place; on a GPU the cast copies"
        )
    lora_node = pack[0].NODE_CLASS_MAPPINGS["UniAlignLoRA"]()
    handle = lora_node.apply(_handle(pack), TINY_LORA, 1.0)[0]
    handle.activate()
    v_full = _velocity(handle.model, text=True)
    mm.unload_all_models()
    base = {k: v.clone() for k, v in handle.model.transformer.state_dict().items()}
    patched = {k[len(services.TRANSFORMER_PREFIX) :] for k in handle.patcher.patches}
    # Which layers a budget streams depends on ComfyUI's order (0.3.64 keeps the biggest layers loaded): shrink the
    # budget until some LoRA layers are streamed, so that their patch is applied as they are cast.
    for divisor in (2, 4, 8, 32, 128):
        handle.patcher.unpatch_model(handle.patcher.offload_device)  # restore the weights a try patched in place
        _partial_load(handle.patcher, handle.patcher.model_size() // divisor)
        services.place_unmanaged(handle.patcher)
        streamed = {n[len(services.TRANSFORMER_PREFIX) :] + ".weight" for n in services.streamed_layers(handle.patcher)}
        if patched & streamed:
            break
    assert patched & streamed, f"no budget streams a LoRA layer (streamed: {sorted(streamed)})"
    assert all(torch.equal(handle.model.transformer.state_dict()[k], base[k]) for k in patched & streamed)
    torch.testing.assert_close(_velocity(handle.model, text=True), v_full, rtol=1e-4, atol=1e-5)
    mm.unload_all_models()


def test_image_mode_leaves_t5_unloadable_and_understanding_keeps_it(pack, monkeypatch):
    services = _services(pack)
    mm = pack[1]
    mm.unload_all_models()
    handle = _handle(pack)
    events = []
    load = mm.load_models_gpu

    def spy(models, *args, **kwargs):
        events.append(["t5" if m is handle.t5_patcher else "main" for m in models])
        return load(models, *args, **kwargs)

    monkeypatch.setattr(services.mm, "load_models_gpu", spy)
    t5 = handle.model.text_encoder.register_forward_hook(lambda *a: events.append("T5 runs"))
    net = handle.model.transformer.register_forward_hook(lambda *a: events.append("transformer runs"))
    try:
        first = _generate(pack, handle)
    finally:
        t5.remove()
        net.remove()
    assert events[:4] == [["main"], ["t5"], "T5 runs", ["main"]]  # T5 loaded only around its one call
    assert set(events[4:]) == {"transformer runs"}  # every step ran with T5 no longer asked for
    loaded = [x.model for x in mm.current_loaded_models]
    assert handle.t5_patcher in loaded
    keep = [x for x in mm.current_loaded_models if x.model is handle.patcher]
    mm.free_memory(1e30, torch.device("cpu"), keep_loaded=keep)  # ComfyUI needs memory: T5 goes
    assert handle.t5_patcher not in [x.model for x in mm.current_loaded_models]
    assert handle.patcher in [x.model for x in mm.current_loaded_models]
    assert torch.equal(_generate(pack, handle), first)  # and comes back for the next prompt

    events.clear()
    handle.activate()  # what UniAlign Understand asks for: T5 with the transformer, for every step
    assert events == [["t5", "main"]] and handle.model.text_encoder_scope is None


@pytest.mark.parametrize("name", ["fp8_e4m3fn", "fp8_e5m2"])
def test_loader_fp8_weights_stay_fp8_through_comfyui(pack, name):
    stored = getattr(torch, "float8_" + name[len("fp8_") :])
    comfy_ops = sys.modules["comfy.ops"]
    handle = _handle(pack, "bf16", name)
    blocks = _linears(handle.model.transformer, FP8_SCOPE)
    assert all(isinstance(m, comfy_ops.manual_cast.Linear) for m in blocks.values())
    image = _generate(pack, handle)
    reference = _generate(pack, _handle(pack, "bf16"))
    assert all(m.weight.dtype == stored for m in blocks.values())  # loaded by ComfyUI and run: still fp8
    assert image.shape == reference.shape and (image.float() - reference.float()).abs().mean() < 0.1
    lora = pack[0].NODE_CLASS_MAPPINGS["UniAlignLoRA"]().apply(handle, TINY_LORA, 1.0)[0]
    deltas = [p[0][1][0] for p in lora.patcher.patches.values()]
    assert all(d.dtype == torch.bfloat16 for d in deltas)  # LoRA deltas are made in the compute dtype
    assert not torch.equal(_generate(pack, lora), image)
