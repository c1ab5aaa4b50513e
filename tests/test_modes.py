"""Every mode end to end on the tiny model: output types and shapes, seeds, callbacks, cancel, bad input."""

import hashlib
import logging

import pytest
import torch
from PIL import Image

from tiny_models import golden_model
from unialign_core import Cancelled, answer, caption, compose, edit, perceive, text_to_image

FAST = dict(steps=2, guidance=3.0)


def state_hash(model):
    h = hashlib.sha256()
    for module in (model.transformer, model.text_encoder, model.vae):
        for k, v in sorted(module.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def model():
    m = golden_model()
    before = state_hash(m)
    yield m
    assert state_hash(m) == before, "a mode changed the model's weights"


def image(h=16, w=24, batch=1, seed=0):
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_text_to_image_shapes_batch_and_non_square(model):
    r = text_to_image(model, "a red cube", width=24, height=16, num_images=3, **FAST)
    assert r.images.shape == (3, 3, 16, 24) and r.latents.shape == (3, 16, 8, 12)
    assert 0 <= r.images.min() and r.images.max() <= 1
    assert not torch.equal(r.latents[0], r.latents[1])  # N images per prompt differ


def test_same_seed_same_image_other_seed_differs(model):
    a = text_to_image(model, "a cat", width=16, height=16, seed=7, **FAST)
    b = text_to_image(model, "a cat", width=16, height=16, seed=7, **FAST)
    c = text_to_image(model, "a cat", width=16, height=16, seed=8, **FAST)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.latents, c.latents)


def test_negative_prompt_changes_the_result(model):
    a = text_to_image(model, "a cat", width=16, height=16, **FAST)
    b = text_to_image(model, "a cat", negative_prompt="blurry", width=16, height=16, **FAST)
    assert not torch.equal(a.latents, b.latents)


def test_edit_keeps_any_size_and_aspect(model):
    r = edit(model, image(12, 28), "make it blue", **FAST)
    assert r.images.shape == (1, 3, 12, 28)


def test_edit_batch_and_image_guidance(model):
    two = edit(model, image(16, 16, batch=2), "make it blue", num_images=2, **FAST)
    assert two.images.shape == (4, 3, 16, 16)
    a = edit(model, image(), "make it blue", **FAST)
    b = edit(model, image(), "make it blue", image_guidance=1.5, **FAST)
    assert not torch.equal(a.latents, b.latents)


def test_edit_accepts_pil_with_alpha_and_grayscale(model):
    rgba = Image.new("RGBA", (16, 8), (255, 0, 0, 128))
    assert edit(model, rgba, "make it blue", **FAST).images.shape == (1, 3, 8, 16)
    gray = torch.rand(1, 1, 8, 8)
    assert edit(model, gray, "make it blue", **FAST).images.shape == (1, 3, 8, 8)


def test_perceive_presets_and_custom(model):
    for task in ("depth", "canny", "pose"):
        assert perceive(model, image(), task, **FAST).images.shape == (1, 3, 16, 24)
    assert perceive(model, image(), "custom", instruction="segment the cat", **FAST).images.shape == (1, 3, 16, 24)
    with pytest.raises(ValueError, match="task 'normals' is not one of"):
        perceive(model, image(), "normals")


def test_compose_one_to_three_references(model):
    for n in (1, 2, 3):
        refs = [image(8, 8, seed=i) for i in range(n)]
        r = compose(model, refs, "these together", width=16, height=20, **FAST)
        assert r.images.shape == (1, 3, 20, 16)
    with pytest.raises(ValueError, match="references: give 1 to 3"):
        compose(model, [image()] * 4, "too many")


@pytest.mark.parametrize("sampler", ["confidence", "ddpm_cache"])
def test_caption_one_clean_string_per_image(model, sampler):
    texts = caption(model, image(batch=2), answer_tokens=12, steps=4, sampler=sampler)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    for t in texts:
        assert "</s>" not in t and "<pad>" not in t and "<extra_id_0>" not in t
    assert caption(model, image(batch=2), answer_tokens=12, steps=4, sampler=sampler) == texts  # seeded


def test_answer_uses_the_question_and_returns_only_the_answer(model):
    out = answer(model, image(), "what colour is the cube?", answer_tokens=24, steps=4)
    assert len(out) == 1 and "Q:" not in out[0]
    with pytest.raises(ValueError, match="raise it above that"):
        answer(model, image(), "what colour is the cube?", answer_tokens=8)


def test_callback_every_step_and_cancel(model):
    seen = []
    text_to_image(model, "a cat", width=16, height=16, callback=lambda i, n, x0: seen.append((i, n, x0.shape)), **FAST)
    assert seen == [(1, 2, (1, 16, 8, 8)), (2, 2, (1, 16, 8, 8))]
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(Cancelled):
        text_to_image(model, "a cat", width=16, height=16, steps=5, cancel=cancel)
    assert len(calls) == 2  # stopped within one step
    with pytest.raises(Cancelled):
        caption(model, image(), answer_tokens=8, steps=5, cancel=lambda: True)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: text_to_image(m, "", width=16, height=16), "prompt is empty"),
        (lambda m: text_to_image(m, "   ", width=16, height=16), "prompt is empty"),
        (lambda m: text_to_image(m, "a cat", width=18, height=16), r"width/height: size 18x16 is not a multiple of 4"),
        (lambda m: edit(m, image(10, 16), "x"), r"image: size 16x10 is not a multiple of 4; resize or crop it"),
        (lambda m: edit(m, image(), ""), "instruction is empty"),
        (lambda m: caption(m, image(), sampler="beam"), "sampler 'beam' is not one of"),
        (lambda m: edit(m, torch.rand(1, 2, 8, 8), "x"), r"image: expected shape \[B, 3, H, W\]"),
    ],
)
def test_bad_input_gets_a_clear_error(model, call, message):
    with pytest.raises(ValueError, match=message):
        call(model)


def test_too_long_prompt_warns_with_the_lost_words(model, caplog):
    """The count of tokens cut and their first words (at most 8 of them: never the whole cut text)."""
    with caplog.at_level(logging.WARNING, logger="unialign_core"):
        model.tokenize(["one two three four five six seven eight nine ten eleven twelve"], 8)
    assert "tokens were cut and not used, starting with 'eight nine ten eleven twelve'" in caplog.text


def test_vqa_prompt_has_no_end_of_text(model, monkeypatch):
    """The question's tokens are frozen without the tokenizer's trailing </s> (the upstream pipeline keeps it)."""
    import unialign_core.modes as modes

    seen = {}
    real = modes._understand

    def spy(m, image, **kwargs):
        seen["ids"] = kwargs["prompt_ids"]
        return real(m, image, **kwargs)

    monkeypatch.setattr(modes, "_understand", spy)
    answer(model, image(), "what colour?", answer_tokens=16, steps=2)
    expected = model.tokenizer("Q: what colour? A: ")["input_ids"]
    assert expected[-1] == model.eos_id
    assert seen["ids"] == expected[:-1]


def test_dynamic_shifting_follows_resolution():
    from unialign_core.flow_sampler import flow_sigmas

    config = {"shift": 3.0, "use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096,
              "base_shift": 0.5, "max_shift": 1.15}  # fmt: skip
    small, large = flow_sigmas(config, 4, 256), flow_sigmas(config, 4, 4096)
    assert small[0] == large[0] == 1.0 and small[-1] == large[-1] == 0.0
    assert (large[1:-1] > small[1:-1]).all()  # more tokens, more time at high noise
    fixed = flow_sigmas({"shift": 3.0}, 4, 256)
    # diffusers: linspace(1, sigma_min, 4) with sigma_min the shifted 1/1000, then SD3's shift 3 again
    sigma_min = 3 * 0.001 / (1 + 2 * 0.001)
    s = 1 - (1 - sigma_min) / 3
    assert torch.allclose(fixed[1], torch.tensor(3 * s / (1 + 2 * s)), atol=1e-5)


def test_understanding_scales_large_images_down(model, monkeypatch):
    import unialign_core.modes as modes

    sizes = []
    real = modes._source_latents
    monkeypatch.setattr(modes, "_source_latents", lambda m, px, *a: sizes.append(px.shape[-2:]) or real(m, px, *a))
    caption(model, image(64, 32), answer_tokens=8, steps=1, resolution=16)
    caption(model, image(8, 12), answer_tokens=8, steps=1, resolution=16)  # smaller: scaled up too
    caption(model, image(10, 14), answer_tokens=8, steps=1, resize="as_is")  # odd sizes: rounded to multiples of 4
    caption(model, image(8, 12), answer_tokens=8, steps=1, resolution=None)  # None: as is (the old spelling)
    assert sizes == [(24, 12), (12, 20), (8, 16), (8, 12)]  # ~16x16 in area, aspect kept, multiples of 4


def test_understanding_default_reads_at_the_trained_size(model, monkeypatch):
    """The tiny model is trained at 32x32 (sample_size 16 latents x 2): a 16x16 image is scaled up by default,
    the official resize-and-crop gives 32x32 from any aspect, and "as_is" keeps 16x16."""
    import unialign_core.modes as modes

    assert modes.trained_side(model) == 32
    sizes = []
    real = modes._source_latents
    monkeypatch.setattr(
        modes, "_source_latents", lambda m, px, *a: sizes.append(tuple(px.shape[-2:])) or real(m, px, *a)
    )
    caption(model, image(16, 16), answer_tokens=8, steps=1)
    answer(model, image(16, 16), "what colour?", answer_tokens=16, steps=1)
    caption(model, image(24, 40), answer_tokens=8, steps=1, resize="crop")
    caption(model, image(16, 16), answer_tokens=8, steps=1, resize="as_is")
    assert sizes == [(32, 32), (32, 32), (32, 32), (16, 16)]
    small = image(16, 16)
    cropped = modes.understanding_input(model, image(16, 32), "crop")
    assert cropped.shape[-2:] == (32, 32)
    assert modes.understanding_input(model, small, "trained").shape[-2:] == (32, 32)
    with pytest.raises(ValueError, match="resize 'bigger' is not one of"):
        caption(model, small, answer_tokens=8, steps=1, resize="bigger")


def test_oversized_images_are_refused_before_any_vae_or_t5_work(model, monkeypatch):
    """The tiny position table is 32 patches: at most 128 px a side. Nothing is encoded before the error."""
    import unialign_core.modes as modes

    assert modes.max_image_side(model) == 128
    for name in ("encode_images", "encode_prompts", "decode_latents"):
        monkeypatch.setattr(model, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} ran before the size check"))
    with pytest.raises(ValueError, match=r"image: size 160x144 is larger than this model allows.*128x128.*128x112"):
        edit(model, image(144, 160), "make it blue", **FAST)
    with pytest.raises(ValueError, match=r"image: size 132x16 .*128x128"):
        perceive(model, image(16, 132), "depth", **FAST)
    with pytest.raises(ValueError, match=r"width/height: size 256x64 .*128x128"):
        text_to_image(model, "a cube", width=256, height=64, **FAST)
    with pytest.raises(ValueError, match=r"width/height: size 16x256"):
        compose(model, [image(16, 16)], "a cube", width=16, height=256, **FAST)
    with pytest.raises(ValueError, match=r"reference 2: size 160x16"):
        compose(model, [image(16, 16), image(16, 160)], "a cube", width=16, height=16, **FAST)
    with pytest.raises(ValueError, match=r"image: size 160x160"):
        caption(model, image(160, 160), answer_tokens=8, steps=1, resize="as_is")


def test_cancel_reaches_the_vae_encode_and_decode(model):
    from unialign_core.vae import CANCEL_POINTS

    calls = []
    with pytest.raises(Cancelled, match="VAE"):  # cancel is first asked inside the VAE encode
        edit(model, image(16, 16), "make it blue", cancel=lambda: calls.append(1) or True, **FAST)
    assert len(calls) == 1
    done = {}
    steps = []

    def callback(step, total, state):
        steps.append(step)
        done["sampled"] = step == total

    with pytest.raises(Cancelled, match="VAE"):  # sampling finishes; Cancel is pressed during the decode
        text_to_image(
            model, "a cube", width=16, height=16, callback=callback, cancel=lambda: done.get("sampled", False), **FAST
        )
    assert steps == [1, 2]
    hooked = [m for m in model.vae.modules() if m._forward_pre_hooks]
    assert hooked == [], "the cancel hooks stay on the VAE"
    assert any(type(m).__name__ in CANCEL_POINTS for m in model.vae.decoder.modules())
    # no cancel: the same pixels as before (the hooks change nothing)
    plain = text_to_image(model, "a cube", width=16, height=16, **FAST).images
    hooked_run = text_to_image(model, "a cube", width=16, height=16, cancel=lambda: False, **FAST).images
    assert torch.equal(plain, hooked_run)


def test_prompt_overflow_names_what_is_cut(model):
    from unialign_core.modes import prompt_overflow

    assert prompt_overflow(model, "a red cube", 8) is None
    cut = prompt_overflow(model, "a red cube on a wooden table next to a blue ball", 8)
    ids = model.tokenizer("a red cube on a wooden table next to a blue ball")["input_ids"]
    assert len(ids) > 8 and cut and cut.endswith("blue ball")
    assert (
        model.tokenizer.decode(ids[:7], skip_special_tokens=True).strip() + " " + cut
        == "a red cube on a wooden table next to a blue ball"
    )
    assert prompt_overflow(model, "word " * 300) is not None  # the model's own limit (256 tokens)
