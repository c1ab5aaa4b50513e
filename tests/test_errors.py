"""Typed errors: the core's InputError names the argument, CheckpointError the file (and the component); the nodes
map them to their own inputs by those fields. A single file of a newer format version is refused.

The core tests need no ComfyUI. The node tests import the real ComfyUI of COMFYUI_DIR in this process (CPU), as
tests/test_memory_tiers.py does; without COMFYUI_DIR they skip.
"""

import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nodes_support import SIDE, TINY_MODEL, import_pack, make_models_dir
from tiny_models import golden_model, write_single_file
from unialign_core import CheckpointError, InputError, answer, caption, compose, edit, load_model, text_to_image
from unialign_core.errors import InputTypeError
from unialign_core.single_file import FORMAT_VERSION

NEWER = str(int(FORMAT_VERSION) + 1)


def image(h=16, w=16, batch=1, seed=0):
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def with_format_version(source, target, version):
    """A copy of a single file with its metadata's format_version replaced."""
    with safe_open(str(source), "pt") as f:
        metadata = dict(f.metadata())
    metadata["format_version"] = version
    save_file(load_file(str(source)), str(target), metadata=metadata)
    return target


# ---- the core ----------------------------------------------------------------------------------------------


def test_a_bad_image_to_caption_is_an_input_error_named_image():
    with pytest.raises(InputError) as excinfo:
        caption(golden_model(), torch.rand(1, 2, 8, 8))
    e = excinfo.value
    assert isinstance(e, ValueError) and e.name == "image"
    assert e.problem == "expected shape [B, 3, H, W], got (1, 2, 8, 8)"
    assert str(e) == "image: expected shape [B, 3, H, W], got (1, 2, 8, 8)"
    with pytest.raises(InputTypeError) as excinfo:
        caption(golden_model(), "a picture.png")
    assert isinstance(excinfo.value, TypeError) and excinfo.value.name == "image"


@pytest.mark.parametrize(
    "call, name, message",
    [
        (lambda m: text_to_image(m, " ", width=16, height=16), "prompt", "prompt is empty; describe what you want"),
        (
            lambda m: text_to_image(m, "a cat", width=19, height=16),
            "width/height",
            "width/height: size 19x16 is not a multiple of 4; resize or crop it, e.g. to 20x16",
        ),
        (
            lambda m: caption(m, image(), sampler="beam"),
            "sampler",
            "sampler 'beam' is not one of ('confidence', 'ddpm_cache')",
        ),
        (lambda m: caption(m, image(), steps=0), "steps", "steps must be at least 1, got 0"),
        (
            lambda m: caption(m, image(), sampler="ddpm_cache", refresh=2),
            "refresh",
            "refresh applies to the confidence sampler only; ddpm_cache runs as published",
        ),
        (
            lambda m: caption(m, image(), resize="bigger"),
            "resize",
            "resize 'bigger' is not one of ('trained', 'crop', 'as_is')",
        ),
        (
            lambda m: compose(m, [image()] * 4, "too many"),
            "references",
            "references: give 1 to 3 reference images, got 4",
        ),
        # NaN passes ComfyUI's min/max check: it silently turned guidance off, or blackened the image
        (
            lambda m: text_to_image(m, "a cat", width=16, height=16, guidance=float("nan")),
            "guidance",
            "guidance: must be a finite number, got nan",
        ),
        (
            lambda m: edit(m, image(), "make it blue", image_guidance=float("nan")),
            "image_guidance",
            "image_guidance: must be a finite number, got nan",
        ),
        (
            lambda m: compose(m, [image()], "these", width=16, height=16, guidance=float("inf")),
            "guidance",
            "guidance: must be a finite number, got inf",
        ),
        # a lone surrogate (half of a UTF-16 pair) is no text: the tokenizer's "TextEncodeInput must be Union[...]"
        (
            lambda m: text_to_image(m, "a red \ud83d cube", width=16, height=16),
            "prompt",
            "prompt: holds a lone surrogate \\ud83d at character 6: half of a UTF-16 pair (e.g. of an emoji), which is "
            "not text; the client sent a broken string: send the whole character or remove it",
        ),
        (
            lambda m: text_to_image(m, "a red cube", negative_prompt="\udc00", width=16, height=16),
            "negative_prompt",
            "negative_prompt: holds a lone surrogate \\udc00 at character 0: half of a UTF-16 pair (e.g. of an emoji), "
            "which is not text; the client sent a broken string: send the whole character or remove it",
        ),
    ],
)
def test_input_errors_name_the_argument(call, name, message):
    with pytest.raises(InputError) as excinfo:
        call(golden_model())
    assert excinfo.value.name == name
    assert str(excinfo.value) == message


def test_too_few_answer_tokens_names_answer_tokens():
    with pytest.raises(InputError) as excinfo:
        answer(golden_model(), image(), "what colour is the cube in the middle of the picture?", answer_tokens=8)
    assert excinfo.value.name == "answer_tokens" and "raise it above that (now 8)" in excinfo.value.problem


def test_prompt_notes_give_the_cut_in_brief_and_what_t5_cannot_read(caplog):
    """A cut prompt's warning gives the count and the first words only (a 1M-character prompt once put 999,827
    characters into the UI and the history); a prompt mostly in a script T5's tokenizer cannot represent (it becomes
    <unk> and is silently ignored) is warned about, naming the language limit."""
    from unialign_core.modes import prompt_notes

    model = golden_model()
    assert prompt_notes(model, "a red cube on a wooden table") == []
    assert prompt_notes(model, "a red cube on a wooden table, so cute 😀") == []  # one unknown character of 31
    huge = "word " * 200_000  # 1,000,000 characters, 200,000 tokens
    (note,) = prompt_notes(model, huge)
    assert note == (
        "prompt: longer than this model's 256 T5 tokens; its last 199745 tokens were cut and not used, starting with "
        "'word word word word word word word word ...'"
    )
    caplog.set_level("WARNING", logger="unialign_core")
    model.tokenize([huge[:20_000]])
    (record,) = [r for r in caplog.records if "T5 tokens" in r.getMessage()]
    assert record.getMessage().startswith("prompt longer than this model's 256 T5 tokens; its last 3745 tokens")
    assert len(record.getMessage()) < 200
    for text in (
        "一只红色的猫坐在桌子上",
        "赤い猫がテーブルの上に座っている",
        "แมวสีแดงนั่งบนโต๊ะ",
        "빨간 고양이가 테이블 위에 앉아 있다",
        "قطة حمراء تجلس على الطاولة",
    ):
        (note,) = prompt_notes(model, text, "instruction")
        assert note.startswith("instruction: 100% of its characters are unknown to the T5 tokenizer and ignored")
        assert "Chinese, Japanese, Korean, Thai, Arabic" in note and note.endswith("Write the instruction in English.")
    (note,) = prompt_notes(model, "一只红色的猫坐在桌子上")
    assert "(e.g. '一只红色的猫坐在桌子上')" in note
    with pytest.raises(InputError) as excinfo:
        prompt_notes(model, "a \ud800 cube", "negative_prompt")
    assert excinfo.value.name == "negative_prompt" and "lone surrogate \\ud800 at character 2" in str(excinfo.value)


def test_a_batch_as_a_reference_is_refused_before_any_image_is_encoded(monkeypatch):
    model = golden_model()
    encoded = []
    monkeypatch.setattr(model, "encode_images", lambda *a, **k: encoded.append(1))
    with pytest.raises(InputError) as excinfo:
        compose(model, [image(), image(batch=2)], "these together", width=16, height=16)
    assert excinfo.value.name == "reference 2"
    assert excinfo.value.problem == "give one image per reference, got a batch of 2"
    assert encoded == []


def test_missing_components_are_named_in_the_checkpoint_error(tmp_path):
    path = write_single_file(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="no text encoder") as excinfo:
        load_model(str(path))
    assert excinfo.value.path == str(path) and excinfo.value.component == "text_encoder"


def test_a_single_file_of_a_newer_format_version_is_refused(tmp_path):
    path = write_single_file(tmp_path / "model.safetensors", bundle=True)
    assert load_model(str(path)).mask_id == golden_model().mask_id  # the copy below differs only in its version
    newer = with_format_version(path, tmp_path / "newer.safetensors", NEWER)
    with pytest.raises(CheckpointError) as excinfo:
        load_model(str(newer))
    e = excinfo.value
    assert e.path == str(newer) and str(e).startswith(f"{newer}: ")
    assert f"format version is {NEWER}" in e.problem and f"versions up to {FORMAT_VERSION}" in e.problem
    assert "update the UniAlignment node pack" in e.problem
    with pytest.raises(CheckpointError, match="damaged metadata header: format_version 'x'"):
        load_model(str(with_format_version(path, tmp_path / "damaged.safetensors", "x")))
    same = with_format_version(path, tmp_path / "same.safetensors", FORMAT_VERSION)
    assert load_model(str(same)).mask_id == golden_model().mask_id


# ---- the nodes (ComfyUI in this process) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pack(comfyui_dir, tmp_path_factory):
    """ComfyUI's modules (CPU) and the pack, with the tiny models (and a newer-format copy) in the folders."""
    if str(comfyui_dir) not in sys.path:
        sys.path.append(str(comfyui_dir))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management as mm
    import folder_paths

    models = make_models_dir(tmp_path_factory.mktemp("models"))
    with_format_version(models / "unialignment" / TINY_MODEL, models / "unialignment" / "newer.safetensors", NEWER)
    module = import_pack("unialign_pack_errors")
    for name in ("unialignment", "loras"):
        folder_paths.folder_names_and_paths[name] = ([str(models / name)], {".safetensors"})
    yield module
    mm.unload_all_models()


def part(pack, name):
    return sys.modules[f"{pack.__name__}.nodes.{name}"]


def node(pack, name):
    return pack.NODE_CLASS_MAPPINGS[name]()


@pytest.fixture(scope="module")
def handle(pack):
    return node(pack, "UniAlignLoader").load(TINY_MODEL, "(from model)", "(from model)", "fp32")[0]


def comfy_image(h=SIDE, w=SIDE, batch=1):
    return torch.rand(batch, h, w, 3, generator=torch.Generator().manual_seed(0))


def test_core_input_errors_become_the_nodes_by_name_not_by_text(pack):
    services, node_error = part(pack, "image_types"), part(pack, "image_types").InputError
    core_error = sys.modules[f"{pack.__name__}.unialign_core.errors"].InputError  # the pack's own copy of the core
    with pytest.raises(node_error) as excinfo:
        with services.core_inputs({"reference 2": "reference_3"}):
            raise core_error("reference 2", "any words at all")
    assert excinfo.value.input_name == "reference_3" and str(excinfo.value) == "reference_3: any words at all"
    with pytest.raises(core_error) as excinfo:  # an argument that is no input of the node passes unchanged
        with services.core_inputs({"image": "image"}):
            raise core_error("noise", "expected shape (1, 16, 8, 8)")
    assert not isinstance(excinfo.value, node_error) and str(excinfo.value) == "noise: expected shape (1, 16, 8, 8)"


def test_compose_names_its_own_input_for_the_core_reference(pack, handle):
    """The core counts the references given (reference 2); the node names the input it came from."""
    with pytest.raises(part(pack, "image_types").InputError) as excinfo:
        node(pack, "UniAlignCompose").compose(
            handle,
            comfy_image(),
            "these together",
            "",
            SIDE,
            SIDE,
            2,
            3.0,
            0,
            1,
            reference_2=None,
            reference_3=comfy_image(batch=2),
        )
    assert excinfo.value.input_name == "reference_3"
    assert str(excinfo.value) == "reference_3: give one image per reference, got a batch of 2"


def test_edit_image_past_the_model_is_named_by_the_core_check(pack, handle):
    with pytest.raises(part(pack, "image_types").InputError) as excinfo:
        node(pack, "UniAlignEdit").edit(handle, comfy_image(160, 160), "make it blue", "", 2, 3.0, 1.0, 0, 1)
    assert excinfo.value.input_name == "image"
    assert str(excinfo.value).startswith("image: size 160x160 is larger than this model allows")
    assert "128x128" in str(excinfo.value)


def test_understand_names_length_and_resize(pack, handle):
    understand = node(pack, "UniAlignUnderstand").understand
    node_error = part(pack, "image_types").InputError
    with pytest.raises(node_error) as excinfo:
        understand(
            handle,
            comfy_image(),
            "confidence",
            8,
            2,
            0,
            question="what colour is the cube in the middle of the picture?",
        )
    assert str(excinfo.value).startswith("length: the question uses") and "raise it above that (now 8)" in str(
        excinfo.value
    )
    assert excinfo.value.input_name == "length"
    with pytest.raises(node_error) as excinfo:
        understand(handle, comfy_image(), "confidence", 16, 2, 0, resize="bigger")
    assert str(excinfo.value) == "resize: 'bigger' is not one of ('trained', 'crop', 'as_is')"


def test_loader_names_the_input_by_the_errors_file_and_component(pack):
    loaders, services = part(pack, "loaders"), part(pack, "model_files")
    model_path = services.resolve_model(TINY_MODEL)
    args = (TINY_MODEL, "t5.safetensors", "vae.safetensors", "/elsewhere/t5.safetensors", "/elsewhere/vae.safetensors")
    cases = [
        (CheckpointError(model_path, "unrelated words", component="text_encoder"), "text_encoder"),
        (CheckpointError("/elsewhere/t5.safetensors", "unrelated words"), "text_encoder"),
        (CheckpointError(model_path, "unrelated words", component="vae"), "vae"),
        (CheckpointError("/elsewhere/vae.safetensors", "unrelated words"), "vae"),
        (CheckpointError(model_path, "the text encoder and no vae, in words only"), "model"),
    ]
    for error, expected in cases:
        assert loaders._loader_error(error, *args).input_name == expected, error


def test_loader_refuses_a_newer_format_version_naming_the_model(pack):
    with pytest.raises(part(pack, "image_types").InputError) as excinfo:
        node(pack, "UniAlignLoader").load("newer.safetensors", "(from model)", "(from model)", "fp32")
    text = str(excinfo.value)
    assert excinfo.value.input_name == "model" and "models/unialignment/newer.safetensors" in text
    assert f"format version is {NEWER}" in text and "update the UniAlignment node pack" in text
