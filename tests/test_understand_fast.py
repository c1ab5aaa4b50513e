"""The faster understanding path: image-stream cache, threshold commits, and what stays exact."""

import math

import pytest
import torch

from test_text_samplers import EOS, MASK, ToyDenoiser
from tiny_models import golden_model
from unialign_core import answer, caption
from unialign_core.text_sampler import CachedTextDenoiser, TextDenoiser, fill_after_eos, sample_confidence


def confidence_as_before(denoiser, x, mask_id, eos_id, steps):
    """The greedy confidence sampler as it was before the threshold existed (the reference for exactness)."""
    x = x.clone()
    for step in range(steps):
        active = (x == mask_id).any(dim=1).nonzero()[:, 0]
        if len(active) == 0:
            break
        rows = x[active]
        masked = rows == mask_id
        logp = denoiser(rows, active).to(x.device)
        tokens = logp.argmax(dim=-1)
        confidence = logp.gather(-1, tokens[..., None])[..., 0].masked_fill(~masked, -math.inf)
        for i in range(len(active)):
            k = math.ceil(int(masked[i].sum()) / (steps - step))
            chosen = confidence[i].topk(k).indices
            rows[i, chosen] = tokens[i, chosen]
            fill_after_eos(rows[i], mask_id, eos_id)
        x[active] = rows
    return x


def latents(batch=2):
    g = torch.Generator().manual_seed(3)
    return torch.randn(batch, 16, 8, 12, generator=g)


def start(model, batch=2, length=20):
    x = torch.full((batch, length), model.mask_id, dtype=torch.long)
    x[1, :3] = torch.tensor([100, 200, 300])  # a frozen prompt in one row
    return x


def test_full_pass_with_cache_is_forward_and_text_pass_reproduces_it():
    m = golden_model()
    lat, ids = latents(), start(golden_model())
    context, zero = m.encode_ids(ids), torch.zeros(2)
    with torch.no_grad():
        ref = m.transformer(lat, context, zero, compute_image=False).text_logits
        out, cache = m.transformer.forward_with_image_cache(lat, context, zero, compute_image=False)
        text_only = m.transformer.forward_text(context, zero, cache).text_logits
    assert torch.equal(out.text_logits, ref)
    assert len(cache.keys) == len(m.transformer.transformer_blocks) and cache.keys[0].shape[2] == 4 * 6
    # the same text against its own image keys/values: only the image half was skipped
    assert (text_only - ref).abs().max().item() < 1e-5
    # and the image keys/values matter: zeroing them changes the text logits
    blank = type(cache)([torch.zeros_like(k) for k in cache.keys], [torch.zeros_like(v) for v in cache.values])
    assert (m.transformer.forward_text(context, zero, blank).text_logits - ref).abs().max().item() > 1e-3


def test_refresh_one_without_threshold_gives_todays_ids():
    m = golden_model()
    lat, x = latents(), start(golden_model())
    before = confidence_as_before(TextDenoiser(m, lat), x, m.mask_id, m.eos_id, steps=6)
    denoiser = CachedTextDenoiser(m, lat, refresh=1)
    now = sample_confidence(denoiser, x, m.mask_id, m.eos_id, steps=6, threshold=None)
    assert torch.equal(now, before)
    assert denoiser.full_passes == denoiser.calls  # every step a full pass
    assert torch.equal(sample_confidence(TextDenoiser(m, lat), x, m.mask_id, m.eos_id, steps=6), before)


def test_cached_steps_run_text_only_and_stay_close():
    m = golden_model()
    lat, x = latents(), start(golden_model())
    exact, cached = TextDenoiser(m, lat), CachedTextDenoiser(m, lat, refresh=3)
    ids = x.clone()
    diffs = []
    for step in range(5):  # reveal a few tokens per call, as a sampler would
        diffs.append((cached(ids) - exact(ids)).abs().max().item())
        ids[:, 3 + 3 * step : 6 + 3 * step] = torch.arange(3) + 500 + step
    assert cached.full_passes == 2  # calls 1 and 4
    assert diffs[0] == 0 and diffs[3] == 0  # full passes are exact
    assert 0 < max(diffs) < 0.5  # text-only passes differ, a little (log-probs, tiny random model)
    out = sample_confidence(CachedTextDenoiser(m, lat, refresh=4), x, m.mask_id, m.eos_id, steps=6, threshold=0.5)
    assert not (out == m.mask_id).any() and torch.equal(out[1, :3], x[1, :3])


def test_cache_follows_the_rows_that_remain():
    m = golden_model()
    lat, ids = latents(), start(golden_model())
    cached = CachedTextDenoiser(m, lat, refresh=8)
    full = cached(ids)
    one = cached(ids[1:], torch.tensor([1]))  # row 0 finished: row 1 alone, from the cache
    assert cached.full_passes == 1
    assert (one - full[1:]).abs().max().item() < 1e-4
    alone = TextDenoiser(m, lat)(ids[1:], torch.tensor([1]))
    assert (one - alone).abs().max().item() < 1e-4


def test_threshold_commits_every_confident_position_at_once():
    toy = ToyDenoiser(length=32)
    x = torch.full((1, 32), MASK)
    out = sample_confidence(toy, x, MASK, EOS, steps=16, threshold=0.9)
    assert out[0, :3].tolist() == [5, 6, 7] and (out[0, 3:] == EOS).all()
    assert toy.calls == 1  # every position is > 0.99 likely: one pass, not four
    strict = ToyDenoiser(length=32)
    sample_confidence(strict, x, MASK, EOS, steps=16, threshold=1.0)  # nothing is that sure: the schedule
    assert strict.calls == 4


def test_threshold_picks_exactly_the_positions_above_it():
    toy = ToyDenoiser(length=8)
    toy.logits[0, 1] = 0.0  # position 1: uniform, far below the threshold
    toy.logits[0, 2, 7] = -1.0  # position 2: the word is no longer confident either
    seen = []
    sample_confidence(toy, torch.full((1, 8), MASK), MASK, EOS, steps=8, threshold=0.9,
                      callback=lambda i, n, ids: seen.append(ids.clone()))  # fmt: skip
    assert seen[0][0, 0] == 5 and (seen[0][0, 3:] == EOS).all()
    assert seen[0][0, 1] == MASK and seen[0][0, 2] == MASK  # several at once, only the confident ones
    assert len(seen) == 3  # then the schedule's one per step for the two unsure positions


def test_modes_take_the_new_settings_and_check_them():
    m = golden_model()
    img = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    exact = caption(m, img, answer_tokens=12, steps=4)
    assert caption(m, img, answer_tokens=12, steps=4, refresh=1, threshold=None) == exact
    fast = caption(m, img, answer_tokens=12, steps=4, refresh=4, threshold=0.9)
    assert len(fast) == 2 and all(isinstance(t, str) for t in fast)
    assert len(answer(m, img[:1], "what is it?", answer_tokens=24, steps=4, refresh=2, threshold=0.8)) == 1
    with pytest.raises(ValueError, match="confidence sampler only"):
        caption(m, img, answer_tokens=12, steps=4, sampler="ddpm_cache", refresh=4)
    with pytest.raises(ValueError, match="refresh must be a whole number"):
        caption(m, img, answer_tokens=12, steps=4, refresh=0)
    with pytest.raises(ValueError, match="threshold is a probability"):
        caption(m, img, answer_tokens=12, steps=4, threshold=1.5)
