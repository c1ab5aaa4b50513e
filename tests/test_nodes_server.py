"""The node pack on a real ComfyUI server (COMFYUI_DIR), with the tiny model.

One server for the whole module, started with latent previews on so that every sampling run also
exercises the preview path (ComfyUI's SD3 previewer, or our own fit on ComfyUI before SD3 support).
"""

import itertools
import json
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from comfy_server import PACK_NAME, PromptError
from nodes_support import (
    SIDE,
    TINY_FOLDER,
    TINY_LORA,
    TINY_MODEL,
    TINY_MULTIPLE,
    WORKFLOW_NAMES,
    WRONG_MODEL,
    cached_nodes,
    image_source,
    load_api,
    make_input_images,
    make_models_dir,
    message,
    output_files,
    read_pixels,
    renumber,
    run,
    save_image_nodes,
    tiny_settings,
    understand_nodes,
    unsupported_reason,
)
from tiny_models import GOLDEN, copy_tree, with_json_entry, with_metadata

sys.path.insert(0, str(__import__("nodes_support").REPO / "tools"))
import make_api  # noqa: E402

pytestmark = pytest.mark.slow  # one real ComfyUI server for the whole file

NODE_IDS = [
    "UniAlignLoader",
    "UniAlignLoRA",
    "UniAlignTextToImage",
    "UniAlignEdit",
    "UniAlignPerceive",
    "UniAlignCompose",
    "UniAlignUnderstand",
]
SAMPLING = {"model": "UNIALIGN_MODEL", "steps": "INT", "guidance": "FLOAT", "seed": "INT"}
EXPECTED = {
    "UniAlignLoader": (
        {"model": "COMBO", "text_encoder": "COMBO", "vae": "COMBO", "dtype": "COMBO", "weight_dtype": "COMBO"},
        ["UNIALIGN_MODEL"],
    ),
    "UniAlignLoRA": ({"model": "UNIALIGN_MODEL", "lora_name": "COMBO", "strength": "FLOAT"}, ["UNIALIGN_MODEL"]),
    "UniAlignTextToImage": (
        dict(SAMPLING, prompt="STRING", negative_prompt="STRING", width="INT", height="INT", batch_size="INT"),
        ["IMAGE", "LATENT"],
    ),
    "UniAlignEdit": (
        dict(
            SAMPLING,
            image="IMAGE",
            instruction="STRING",
            negative_prompt="STRING",
            image_guidance="FLOAT",
            batch_size="INT",
        ),
        ["IMAGE", "LATENT"],
    ),
    "UniAlignPerceive": (dict(SAMPLING, image="IMAGE", task="COMBO", instruction="STRING"), ["IMAGE", "LATENT"]),
    "UniAlignCompose": (
        dict(
            SAMPLING,
            reference_1="IMAGE",
            reference_2="IMAGE",
            reference_3="IMAGE",
            prompt="STRING",
            negative_prompt="STRING",
            width="INT",
            height="INT",
            batch_size="INT",
        ),
        ["IMAGE", "LATENT"],
    ),
    "UniAlignUnderstand": (
        {
            "model": "UNIALIGN_MODEL",
            "image": "IMAGE",
            "question": "STRING",
            "sampler": "COMBO",
            "length": "INT",
            "steps": "INT",
            "sampler_seed": "INT",
            "short_answer": "BOOLEAN",
            "resize": "COMBO",
        },
        ["STRING"],
    ),
}
_ids = itertools.count(1)
CONVERT = "python -m unialign_core.convert /path/to/UniAlignment ../../models/unialignment/unialignment.safetensors"


@pytest.fixture(scope="module")
def server(start_comfy_server, tmp_path_factory):
    started = time.monotonic()
    global server_models
    models = server_models = make_models_dir(tmp_path_factory.mktemp("models"))
    server = start_comfy_server(models, extra_args=["--preview-method", "latent2rgb"])
    make_input_images(server.base_dir / "input")
    print(f"\nmodels written and ComfyUI up in {time.monotonic() - started:.1f} s")
    yield server
    assert "preview failed" not in server.log_text()


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


def fresh(api):
    """The same graph under new node ids, so that no ComfyUI version can answer it from its cache."""
    return renumber(api, f"r{next(_ids)}_")


def t2i_prompt(
    prompt="a red cube on a table",
    model=TINY_MODEL,
    steps=4,
    width=SIDE,
    height=SIDE,
    dtype="auto",
    lora=None,
    batch_size=1,
    weight_dtype="default",
):
    api = {
        "1": {
            "class_type": "UniAlignLoader",
            "inputs": {
                "model": model,
                "text_encoder": "(from model)",
                "vae": "(from model)",
                "dtype": dtype,
                "weight_dtype": weight_dtype,
            },
        },
        "2": {
            "class_type": "UniAlignTextToImage",
            "inputs": {
                "model": ["1", 0],
                "prompt": prompt,
                "negative_prompt": "",
                "width": width,
                "height": height,
                "steps": steps,
                "guidance": 5.0,
                "seed": 7,
                "batch_size": batch_size,
            },
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "t2i"}},
    }
    if lora is not None:
        api["4"] = {
            "class_type": "UniAlignLoRA",
            "inputs": {"model": ["1", 0], "lora_name": TINY_LORA, "strength": lora},
        }
        api["2"]["inputs"]["model"] = ["4", 0]
    return fresh(api)


def run_t2i(server, **kwargs):
    """Run a text-to-image prompt; return its pixels and history entry (asserting it really ran)."""
    api = t2i_prompt(**kwargs)
    entry = run(server, api)
    sampler = next(k for k, n in api.items() if n["class_type"] == "UniAlignTextToImage")
    assert sampler not in cached_nodes(entry)
    save = save_image_nodes(api)[0]
    return np.stack([read_pixels(p) for p in output_files(server, entry, save)]), entry


# ---- the node definitions ---------------------------------------------------------------------


def test_object_info_lists_every_node(object_info):
    for node_id in NODE_IDS:
        assert node_id in object_info, f"{node_id} missing from /object_info"
        info = object_info[node_id]
        schema = make_api.node_schema(info)
        inputs, outputs = EXPECTED[node_id]
        assert schema["inputs"] == inputs, node_id
        assert info["output"] == outputs, node_id
        assert info["category"] == "UniAlignment"
        assert info["display_name"].startswith("UniAlign ")
        assert len(info["description"]) > 40, f"{node_id} has no DESCRIPTION"
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert len(spec) > 1 and len(spec[1].get("tooltip", "")) > 15, f"{node_id}.{name} has no tooltip"
        if "seed" in inputs:
            assert info["input"]["required"]["seed"][1]["control_after_generate"] is True
    understand = object_info["UniAlignUnderstand"]
    assert understand["output_node"] is True and understand["output_is_list"] == [True]
    resize = understand["input"]["optional"]["resize"]
    assert resize[0] == ["trained", "crop", "as_is"] and resize[1]["default"] == "trained"


def test_widget_limits_match_the_released_model(object_info):
    """Sides stop at the released model's position table (192 x 16 = 3072 px); guidance below 1 (CFG off, the
    same image as 1.0) is not offered, and the tooltip says what 1.0 does."""
    for node_id in ("UniAlignTextToImage", "UniAlignCompose"):
        required = object_info[node_id]["input"]["required"]
        for side in ("width", "height"):
            assert required[side][1]["max"] == 3072 and "3072" in required[side][1]["tooltip"]
    for node_id in ("UniAlignTextToImage", "UniAlignEdit", "UniAlignPerceive", "UniAlignCompose"):
        guidance = object_info[node_id]["input"]["required"]["guidance"][1]
        assert guidance["min"] == 1.0 and "off" in guidance["tooltip"] and "1.0" in guidance["tooltip"]


def test_loader_lists_files_and_upstream_folders(object_info):
    required = object_info["UniAlignLoader"]["input"]["required"]
    models = required["model"][0]
    assert {TINY_MODEL, TINY_FOLDER, WRONG_MODEL} <= set(models)
    assert not any(name.startswith(TINY_FOLDER + "/") for name in models), "files inside a model folder are listed"
    assert required["text_encoder"][0][0] == "(from model)" and required["vae"][0][0] == "(from model)"
    assert required["dtype"][0] == ["auto", "bf16", "fp16", "fp32"]
    assert required["weight_dtype"][0] == ["default", "fp8_e4m3fn", "fp8_e5m2"]
    assert TINY_LORA in object_info["UniAlignLoRA"]["input"]["required"]["lora_name"][0]


def test_workflow_schema_and_api_twins_match_the_server(object_info):
    """The stored widget schema is this server's, and converting the UI files with it gives the stored twins (for
    the workflows this server can run: the March 2024 ComfyUI has no native ones; tests/test_native.py checks those
    on ComfyUI 0.3.64)."""
    paths = [p for p in make_api.ui_workflows()
             if not unsupported_reason(json.loads(make_api.twin_path(p).read_text()), object_info)]  # fmt: skip
    assert paths
    live = make_api.schema_from_object_info(object_info, make_api.used_classes(paths))
    stored = make_api.load_schema()
    assert live == {c: stored[c] for c in live}
    for path in paths:
        ui = json.loads(path.read_text(encoding="utf-8"))
        make_api.check_ui(ui, live, path.name)
        assert make_api.ui_to_api(ui, live, path.name) == json.loads(make_api.twin_path(path).read_text())


def test_web_extension_is_served(server):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(server.url + "/extensions", timeout=30) as reply:
        scripts = json.loads(reply.read())
    ours = [s for s in scripts if PACK_NAME in s]
    assert ours and ours[0].endswith("show_text.js")
    with opener.open(server.url + ours[0], timeout=30) as reply:
        assert b"UniAlignUnderstand" in reply.read()


def test_validation_names_each_missing_file_once_on_its_input(server):
    """Queued without the model files (issue 22 item 7): the 400 reply names each missing file once, on its own input
    (the Loader's check of `model` is attached to `model` alone; ComfyUI checks text_encoder and vae against their
    lists); the model's message says how to convert the download. A missing VAE alone is named on `vae` alone."""
    missing = {"model": "no_such_model.safetensors", "text_encoder": "no_t5.safetensors", "vae": "no_vae.safetensors"}
    for inputs in (missing, {"vae": "no_vae.safetensors"}):
        api = t2i_prompt()
        loader = next(k for k, n in api.items() if n["class_type"] == "UniAlignLoader")
        api[loader]["inputs"].update(inputs)
        with pytest.raises(PromptError) as excinfo:
            server.queue_prompt(api)
        assert excinfo.value.status == 400
        errors = excinfo.value.body["node_errors"][loader]["errors"]
        named = sorted(e["extra_info"]["input_name"] for e in errors)
        assert named == sorted(inputs), json.dumps(errors, indent=1)
        words = {e["extra_info"]["input_name"]: f"{e['message']}: {e['details']}" for e in errors}
        for name, value in inputs.items():
            assert value in words[name], words
            assert sum(w.count(value) for w in words.values()) == 1, words  # on its own input only
        if "model" in inputs:
            assert "models/unialignment" in words["model"] and CONVERT in words["model"], words["model"]
            no_server_path(json.dumps(errors))


# ---- the example workflows ----------------------------------------------------------------------


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_workflow_runs(server, object_info, name):
    reason = unsupported_reason(load_api(name), object_info)
    if reason:
        pytest.skip(reason)
    api = fresh(tiny_settings(load_api(name)))
    entry = run(server, api)
    saves = save_image_nodes(api)
    texts = understand_nodes(api)
    assert saves or texts
    for save in saves:
        files = output_files(server, entry, save)
        assert len(files) == 1
        assert read_pixels(files[0]).shape == (SIDE, SIDE, 3), f"{files[0]} has the wrong size"
    for node in texts:
        text = entry["outputs"][node]["text"]
        assert len(text) == 1 and isinstance(text[0], str) and text[0].strip(), text
    if name in ("edit_caption_loop", "native_edit_caption_loop"):
        # edited image, caption, generated image: all three shown
        assert len(saves) == 2 and len(texts) == 1
        assert image_source(api, texts[0]) == image_source(api, saves[0])


def test_batched_images_give_one_text_each(server):
    api = t2i_prompt(batch_size=3)
    sampler = next(k for k, n in api.items() if n["class_type"] == "UniAlignTextToImage")
    loader = api[sampler]["inputs"]["model"][0]
    api["u"] = {
        "class_type": "UniAlignUnderstand",
        "inputs": {
            "model": [loader, 0],
            "image": [sampler, 0],
            "sampler": "ddpm_cache",
            "length": 24,
            "steps": 6,
            "sampler_seed": 0,
            "question": "What is this?",
            "short_answer": True,
        },
    }
    entry = run(server, api)
    assert len(entry["outputs"]["u"]["text"]) == 3
    assert len(output_files(server, entry, save_image_nodes(api)[0])) == 3


def test_prompt_notes_are_shown_on_the_node(server):
    """A prompt past the T5 limit: how many tokens were cut and its first words, never the whole cut text, in the
    node's UI output (shown on the node, and in /history for API clients); a prompt in a script T5's tokenizer cannot
    represent: a warning naming the language limit. The images are made all the same."""
    long_prompt = "token limit test: " + " ".join(f"word{i}" for i in range(20000)) + " the very end"  # 189k chars
    api = t2i_prompt(prompt=long_prompt)
    sampler = next(k for k, n in api.items() if n["class_type"] == "UniAlignTextToImage")
    entry = run(server, api)
    (warning,) = entry["outputs"][sampler]["text"]
    assert warning == (
        "prompt: longer than this model's 256 T5 tokens; its last 60402 tokens were cut and not used, starting with "
        "'word125 word126 word127 word128 word129 word130 word131 word132 ...'"
    )
    assert len(json.dumps(entry["outputs"])) < 1000, "the cut text went into the history"
    api = t2i_prompt(prompt="一只红色的猫坐在桌子上")
    sampler = next(k for k, n in api.items() if n["class_type"] == "UniAlignTextToImage")
    (warning,) = run(server, api)["outputs"][sampler]["text"]
    assert warning.startswith("prompt: 100% of its characters are unknown to the T5 tokenizer and ignored")
    assert "Chinese, Japanese, Korean, Thai, Arabic" in warning
    short = run(server, t2i_prompt(prompt="token limit test: short"))
    assert all(not out.get("text") for out in short["outputs"].values())


def test_understand_resize_options_run(server):
    """Each resize policy runs on a 40x56 input (trained: ~32x32 for the tiny model, crop: 32x32, as_is: 40x56)."""
    api = fresh(tiny_settings(load_api("understanding")))
    scale = next(n for n in api.values() if n["class_type"] == "ImageScale")
    scale["inputs"].update(width=40, height=56)
    texts = {}
    for resize in ("trained", "crop", "as_is"):
        for node in api.values():
            if node["class_type"] == "UniAlignUnderstand":
                node["inputs"]["resize"] = resize
        entry = run(server, fresh(api))
        texts[resize] = [t for out in entry["outputs"].values() for t in out.get("text", [])]
        assert texts[resize] and all(isinstance(t, str) for t in texts[resize])
    huge = fresh(api)
    for node in huge.values():
        if node["class_type"] == "ImageScale":
            node["inputs"].update(width=160, height=160)
        if node["class_type"] == "UniAlignUnderstand":
            node["inputs"]["resize"] = "as_is"
    error = error_of(server.wait(server.queue_prompt(huge)))
    assert error["node_type"] == "UniAlignUnderstand" and "128x128" in error["exception_message"]


def test_latent_output_is_sd3_format(server):
    """LATENT holds raw VAE latents: ComfyUI's SD3 format (process_in = (z - 0.0609) * 1.5305 gives ours)."""
    import torch

    from tiny_models import golden_model
    from unialign_core import text_to_image

    api = t2i_prompt(prompt="latent test: a red cube")
    sampler = next(k for k, n in api.items() if n["class_type"] == "UniAlignTextToImage")
    api["l"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 1], "filename_prefix": "latent"}}
    entry = run(server, api)
    files = sorted((server.base_dir / "output").glob("latent_*.latent"))
    assert files, entry["outputs"]
    samples = load_file(str(files[-1]))["latent_tensor"]
    expected = text_to_image(
        golden_model(), "latent test: a red cube", width=SIDE, height=SIDE, steps=4, guidance=5.0, seed=7
    ).latents
    assert samples.shape == (1, 16, SIDE // 2, SIDE // 2)
    torch.testing.assert_close((samples - 0.0609) * 1.5305, expected, atol=1e-4, rtol=1e-4)


# ---- model management ---------------------------------------------------------------------------


# Each test uses its own prompt, and a repeated run spells the dtype differently ("auto" and "fp32"
# are the same on the CPU), so that no ComfyUI version answers a run from its node cache.


def test_lora_leaves_the_base_model_unchanged(server):
    prompt = "lora test: a red cube"
    base, _ = run_t2i(server, prompt=prompt, dtype="auto")
    with_lora, _ = run_t2i(server, prompt=prompt, lora=1.0)
    assert np.abs(with_lora.astype(int) - base.astype(int)).mean() > 1.0, "the LoRA changed nothing"
    half, _ = run_t2i(server, prompt=prompt, lora=0.5)
    assert not np.array_equal(half, with_lora)
    again, _ = run_t2i(server, prompt=prompt, dtype="fp32")
    np.testing.assert_array_equal(again, base)


def test_fp8_weights_run_and_change_the_image_only_slightly(server):
    prompt = "fp8 test: a red cube"
    base, _ = run_t2i(server, prompt=prompt, dtype="bf16")
    fp8, _ = run_t2i(server, prompt=prompt, dtype="bf16", weight_dtype="fp8_e4m3fn")
    diff = np.abs(fp8.astype(int) - base.astype(int)).mean()
    assert 0 < diff < 20, f"fp8 weights changed the image by {diff:.2f} levels on average"
    assert "block weights torch.float8_e4m3fn" in server.log_text()


def test_upstream_folder_gives_the_same_image_as_the_single_file(server):
    prompt = "folder test: a red cube"
    from_file, _ = run_t2i(server, prompt=prompt)
    from_folder, _ = run_t2i(server, prompt=prompt, model=TINY_FOLDER)
    np.testing.assert_array_equal(from_folder, from_file)


def test_prompt_change_does_not_reload_the_model(server):
    run_t2i(server, prompt="a blue ball")
    loads = server.log_text().count(f"[UniAlign] loaded model {TINY_MODEL}")
    run_t2i(server, prompt="a green pyramid")
    run_t2i(server, prompt="a yellow cube", dtype="fp32")  # fp32 is what auto picks on the CPU
    assert server.log_text().count(f"[UniAlign] loaded model {TINY_MODEL}") == loads


# ---- bad inputs: a clear error naming the input, and the server carries on ------------------------


GOOD_PROMPT = "bad input test: a red cube"
_good = {"dtype": "auto"}


def good_run(server):
    """The good prompt, spelled differently from the last good run, so that it is computed again."""
    pixels, _ = run_t2i(server, prompt=GOOD_PROMPT, dtype=_good["dtype"])
    _good["dtype"] = "fp32" if _good["dtype"] == "auto" else "auto"
    return pixels


@pytest.fixture(scope="module")
def baseline(server):
    return good_run(server)


def error_of(entry):
    assert entry["status"]["status_str"] == "error", entry["status"]
    payload = message(entry, "execution_error")
    assert payload is not None, entry["status"]["messages"]
    return payload


def bad_missing_model(server):
    with pytest.raises(PromptError) as excinfo:
        server.queue_prompt(t2i_prompt(model="no_such_model.safetensors"))
    assert excinfo.value.status == 400
    ((node_id, errors),) = excinfo.value.body["node_errors"].items()
    assert errors["class_type"] == "UniAlignLoader"
    text = json.dumps(errors["errors"])
    assert "model" in text and "no_such_model.safetensors" in text and "models/unialignment" in text
    assert CONVERT in text  # how to make the file, as the README says
    return no_server_path(text)


def bad_wrong_architecture(server):
    entry = server.wait(server.queue_prompt(t2i_prompt(model=WRONG_MODEL)))
    error = error_of(entry)
    assert error["node_type"] == "UniAlignLoader"
    assert error["exception_message"].startswith("model: ")
    assert WRONG_MODEL in error["exception_message"] and "not a UniAlignment" in error["exception_message"]
    assert f"models/unialignment/{WRONG_MODEL}" in error["exception_message"]
    return no_server_path(error["exception_message"])


def bad_image_size(server):
    api = fresh(tiny_settings(load_api("edit")))
    scale = next(n for n in api.values() if n["class_type"] == "ImageScale")
    scale["inputs"].update(width=30, height=30)
    error = error_of(server.wait(server.queue_prompt(api)))
    assert error["node_type"] == "UniAlignEdit"
    assert error["exception_message"].startswith("image: ")
    assert "30x30" in error["exception_message"] and f"multiple of {TINY_MULTIPLE}" in error["exception_message"]
    return error["exception_message"]


def bad_width(server):
    """The core checks width and height together: its error names both, with a size that works."""
    error = error_of(server.wait(server.queue_prompt(t2i_prompt(width=30))))
    assert error["node_type"] == "UniAlignTextToImage"
    assert error["exception_message"] == (
        f"width/height: size 30x{SIDE} is not a multiple of {TINY_MULTIPLE}; resize or crop it, e.g. to 32x{SIDE}"
    )
    return error["exception_message"]


def bad_empty_prompt(server):
    error = error_of(server.wait(server.queue_prompt(t2i_prompt(prompt="   "))))
    assert error["node_type"] == "UniAlignTextToImage"
    assert error["exception_message"] == "prompt: is empty; describe what you want"
    return error["exception_message"]


def no_server_path(text):
    """Messages sent to clients name files relative to their models folder, never where the server keeps them."""
    for path in {str(server_models), str(server_models.resolve())}:
        assert path not in text, text
    return text


server_models = None


def bad_pickle_by_name(server):
    """A .ckpt named through the API is refused before it is queued, with what to do instead."""
    with pytest.raises(PromptError) as excinfo:
        server.queue_prompt(t2i_prompt(model="old_release.ckpt"))
    assert excinfo.value.status == 400
    text = json.dumps(excinfo.value.body["node_errors"])
    assert "pickle" in text and "python -m unialign_core.convert" in text and ".safetensors release" in text
    return no_server_path(text)


def bad_oversized_source(server):
    """An edit source past the tiny model's position table (32 patches x 4 px = 128 px) is refused before the
    VAE runs (the encode at this size would take far longer than the check)."""
    api = fresh(tiny_settings(load_api("edit")))
    scale = next(n for n in api.values() if n["class_type"] == "ImageScale")
    scale["inputs"].update(width=512, height=512)
    started = time.monotonic()
    error = error_of(server.wait(server.queue_prompt(api)))
    elapsed = time.monotonic() - started
    assert error["node_type"] == "UniAlignEdit"
    message_text = error["exception_message"]
    assert message_text.startswith("image: size 512x512 is larger than this model allows") and "128x128" in message_text
    assert elapsed < 20, f"the size error took {elapsed:.1f} s"
    return f"{message_text} ({elapsed:.1f} s)"


def bad_width_past_the_model(server):
    error = error_of(server.wait(server.queue_prompt(t2i_prompt(width=256))))
    assert error["node_type"] == "UniAlignTextToImage"
    assert error["exception_message"].startswith(f"width/height: size 256x{SIDE} is larger than this model allows")
    assert "128x128" in error["exception_message"]
    return error["exception_message"]


class _PickledCode:
    """Unpickling this runs print(...): what a crafted .pth does with worse code."""

    def __reduce__(self):
        return (print, ("pwned",))


def bad_model_files(server):
    """Files whose metadata once aborted the whole server (text_length 1e9 at the first prompt), kept the loader busy
    (4000 layers) or gave raw Python text ("unexpected keyword argument 'foo'") are refused by the Loader, naming the
    file, the entry, its value and what is expected; a .pth that is not a plain tensor file is refused without
    torch's advice to load it unsafely."""
    folder = server_models / "unialignment"
    source = folder / TINY_MODEL

    def entry(key, **entries):
        return lambda target: with_json_entry(source, target, key, **entries)

    def meta(**changes):
        return lambda target: with_metadata(source, target, **changes)

    def pickled_mask(target):
        copy_tree(GOLDEN, target)
        (target / "checkpoint").mkdir()
        torch.save({"x": _PickledCode()}, target / "checkpoint" / "mask_token_emb.00-of-01.pth")

    cases = {
        "bad_text_length.safetensors": (meta(text_length="1000000000"), "text_length is 1000000000, more than 4096"),
        "bad_layers.safetensors": (
            entry("model_config", num_layers=4000),
            "model_config.num_layers is 4000, more than 64",
        ),
        "bad_key.safetensors": (
            entry("model_config", foo=1),
            "unknown transformer config entries ['foo'] in model_config",
        ),
        "bad_config_list.safetensors": (meta(model_config=[1, 2]), "metadata model_config must be a JSON object"),
        "bad_mask_dtype.safetensors": (
            meta(mask_embedding={"dtype": "int64", "values": [1] * 32}),
            "metadata mask_embedding has dtype 'int64', expected one of float32",
        ),
        "bad_tokenizer.safetensors": (meta(tokenizer="{broken"), "metadata tokenizer is not a valid tokenizer.json"),
        "bad_vae.safetensors": (entry("vae_config", foo=1), "unknown VAE config entries ['foo'] in vae_config"),
        "bad_scheduler.safetensors": (
            entry("scheduler_config", shift="fast"),
            "scheduler_config.shift is 'fast', expected a number",
        ),
        "pickled_mask": (pickled_mask, "mask_token_emb.00-of-01.pth: not a plain tensor file"),
    }
    shown = []
    for name, (make, expected) in cases.items():
        make(folder / name)
        started = time.monotonic()
        error = error_of(server.wait(server.queue_prompt(t2i_prompt(model=name))))
        text = error["exception_message"]
        assert error["node_type"] == "UniAlignLoader" and text.startswith("model: "), text
        assert f"models/unialignment/{name}" in text and expected in text, text
        assert "weights_only=False" not in text and "Traceback" not in text, text
        no_server_path(text)
        shown.append(f"{name} ({time.monotonic() - started:.1f} s): {text[:160]}")
    return "\n".join(shown)


def bad_nan_inputs(server):
    """NaN passes ComfyUI's min/max check: guidance NaN acted as 1.0, LoRA strength and image_guidance NaN gave a
    black image reported as success. Each is refused naming the input."""
    nan = float("nan")
    guidance = t2i_prompt(prompt="nan test: guidance")
    next(n for n in guidance.values() if n["class_type"] == "UniAlignTextToImage")["inputs"]["guidance"] = nan
    image_guidance = fresh(tiny_settings(load_api("edit")))
    next(n for n in image_guidance.values() if n["class_type"] == "UniAlignEdit")["inputs"]["image_guidance"] = nan
    cases = [
        (guidance, "UniAlignTextToImage", "guidance: must be a finite number, got nan"),
        (t2i_prompt(prompt="nan test: lora", lora=nan), "UniAlignLoRA", "strength: must be a finite number, got nan"),
        (image_guidance, "UniAlignEdit", "image_guidance: must be a finite number, got nan"),
    ]
    for api, node_type, expected in cases:
        error = error_of(server.wait(server.queue_prompt(api)))
        assert error["node_type"] == node_type and error["exception_message"] == expected, error
    return "; ".join(expected for _, _, expected in cases)


def bad_lone_surrogate(server):
    """Half of a UTF-16 pair in the prompt: a clear error, not the tokenizer's "TextEncodeInput must be Union[...]"."""
    error = error_of(server.wait(server.queue_prompt(t2i_prompt(prompt="a red \ud83d cube"))))
    assert error["node_type"] == "UniAlignTextToImage"
    assert error["exception_message"].startswith("prompt: holds a lone surrogate \\ud83d at character 6")
    return error["exception_message"]


def bad_interrupt(server):
    steps = 3000  # about 0.05 s each at 64x64 on the tiny model: minutes if not interrupted
    prompt_id = server.queue_prompt(t2i_prompt(steps=steps))
    started = time.monotonic()
    while not server.get_json("/queue")["queue_running"]:
        assert time.monotonic() - started < 30
        time.sleep(0.05)
    time.sleep(1.5)  # the model is cached: this is well into sampling
    server.interrupt()
    entry = server.wait(prompt_id, timeout=60)
    elapsed = time.monotonic() - started
    assert entry["status"]["status_str"] == "error"
    payload = message(entry, "execution_interrupted")
    assert payload is not None and payload["node_type"] == "UniAlignTextToImage", entry["status"]["messages"]
    assert elapsed < 20, f"the interrupt took {elapsed:.1f} s"
    return f"interrupted after {elapsed:.1f} s"


@pytest.mark.parametrize(
    "case",
    [
        bad_missing_model,
        bad_wrong_architecture,
        bad_image_size,
        bad_width,
        bad_empty_prompt,
        bad_pickle_by_name,
        bad_oversized_source,
        bad_width_past_the_model,
        bad_model_files,
        bad_nan_inputs,
        bad_lone_surrogate,
        bad_interrupt,
    ],
    ids=lambda f: f.__name__[4:],
)
def test_bad_input_then_same_good_output(server, baseline, case):
    print(f"\n{case.__name__}: {case(server)}")
    np.testing.assert_array_equal(good_run(server), baseline)
