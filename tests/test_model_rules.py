"""The rules training and inference share, each owned by UniAlignModel / unialign_core (unialign_core/model.py)."""

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_models import golden_model
from unialign_core import DTYPES, CheckpointError
from unialign_core.images import on_white, pil_to_tensor, to_tensor
from unialign_core.loader import sd3_transformer_config, transformer_config_from_upstream
from unialign_core.model import VQA_TEMPLATE


@pytest.fixture(scope="module")
def model():
    return golden_model()


def test_scale_and_unscale_are_the_vae_config_formula(model):
    config = model.vae.config
    assert (config.shift_factor, config.scaling_factor) != (0.0, 1.0)  # the formula is not the identity here
    raw = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    scaled = model.scale_latents(raw)
    torch.testing.assert_close(scaled, (raw - config.shift_factor) * config.scaling_factor)
    torch.testing.assert_close(model.unscale_latents(scaled), raw)


def test_decode_reads_the_same_scaling(model):
    """decode_latents(x) is the VAE's decoding of unscale_latents(x)."""
    latents = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        by_hand = ((model.vae.decode(model.unscale_latents(latents)).sample.float() + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(model.decode_latents(latents), by_hand)


def test_question_ids_drop_the_trailing_eos(model):
    full = model.tokenizer(VQA_TEMPLATE.format(question="what colour?"))["input_ids"]
    assert full[-1] == model.eos_id
    ids = model.question_ids("what colour?")
    assert ids == full[:-1] and model.eos_id not in ids


def test_vqa_training_rows_keep_the_prompt_unmaskable(model):
    prompt = model.question_ids("what colour?")
    answer = model.tokenizer("red")["input_ids"]
    ids, maskable, not_pad = model.caption_ids("vqa", "what colour?", "red", 16)
    assert len(ids) == len(maskable) == len(not_pad) == 16
    assert ids[: len(prompt)] == prompt and ids[len(prompt) : len(prompt) + len(answer)] == answer
    assert not any(maskable[: len(prompt)]) and all(maskable[len(prompt) :])
    assert sum(not_pad) == len(prompt) + len(answer) and all(i == model.eos_id for i in ids[sum(not_pad) :])
    # a caption learns every token; the default length is the model's own text_length
    ids, maskable, _ = model.caption_ids("caption", "", "a red cube")
    assert len(ids) == model.text_length and all(maskable)


def test_tokenize_defaults_to_the_text_length(model):
    assert model.tokenize(["a red cube"]).shape == (1, model.text_length)
    assert model.tokenize(["a red cube"], 8).shape == (1, 8)


def test_one_dtype_map():
    import train.export
    import train.loop
    import unialign_core.convert

    assert DTYPES == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    assert train.loop.DTYPES is DTYPES and unialign_core.convert.DTYPES is DTYPES and train.export.DTYPES is DTYPES


def test_alpha_on_white_is_one_rule_for_tensors_and_pil():
    rgba = torch.rand(1, 4, 3, 5, generator=torch.Generator().manual_seed(2))
    expected = rgba[:, :3] * rgba[:, 3:] + (1 - rgba[:, 3:])
    torch.testing.assert_close(on_white(rgba, dim=1), expected)
    torch.testing.assert_close(on_white(rgba.movedim(1, -1), dim=-1).movedim(-1, 1), expected)
    torch.testing.assert_close(to_tensor(rgba), expected)
    # a PIL image with alpha: the same result within 8-bit rounding
    q = (rgba * 255).round() / 255
    pil = Image.fromarray((q[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), "RGBA")
    torch.testing.assert_close(pil_to_tensor(pil), on_white(q, dim=1), atol=1.5 / 255, rtol=0)
    # gray + alpha in PA / La modes is composited too, not dropped
    la = Image.fromarray(np.array([[[0, 0]]], dtype=np.uint8), "LA")  # black, fully transparent
    assert pil_to_tensor(la).flatten().tolist() == [1.0, 1.0, 1.0]


def test_sixteen_bit_images_are_scaled_not_clipped():
    depth = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert depth.mode.startswith("I")
    values = (pil_to_tensor(depth)[0, 0, 0] * 255).round().tolist()
    assert values == [0.0, 128.0, 255.0]


def test_feature_cache_helper(tmp_path):
    from train.feature_cache import FeatureCache, cached

    cache = FeatureCache(tmp_path)
    keys = [FeatureCache.key("t", i) for i in range(3)]
    calls = []

    def compute(todo):
        calls.append(list(todo))
        return torch.stack([torch.full((2,), float(i)) for i in todo])

    out, computed = cached(3, cache, keys, compute)
    assert computed == 3 and calls == [[0, 1, 2]] and [o[0].item() for o in out] == [0.0, 1.0, 2.0]
    out, computed = cached(3, cache, keys, compute)
    assert computed == 0 and len(calls) == 1 and [o[0].item() for o in out] == [0.0, 1.0, 2.0]
    out, computed = cached(2, None, None, compute)  # no cache: everything is computed
    assert computed == 2 and calls[-1] == [0, 1]


def test_sd35_is_refused_as_model_and_as_training_start():
    for extra in ({"dual_attention_layers": [0]}, {"qk_norm": "rms_norm"}):
        with pytest.raises(CheckpointError, match="SD3.5"):
            transformer_config_from_upstream(dict(vocab_size=10, **extra), "model")
        with pytest.raises(CheckpointError, match="SD3.5"):
            sd3_transformer_config(dict(extra), 10, path="start")
