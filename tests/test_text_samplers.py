"""The two text samplers on toy distributions, where the right answer can be worked out by hand."""

import math

import torch

from unialign_core.text_sampler import ddpm_cache_update, sample_confidence, sample_ddpm_cache, subs_log_probs

MASK, EOS = 3, 1


def test_ddpm_cache_step_matches_hand_computation():
    # Vocabulary {0, 1, 2, MASK}; t = 0.5, dt = 0.25, so s = 0.25.
    # q = p * (t - s) = p * 0.25 for tokens, q[MASK] = s = 0.25; winner = argmax q / (-log u).
    p = torch.tensor([[[0.7, 0.2, 0.1, 0.0], [0.7, 0.2, 0.1, 0.0], [0.1, 0.1, 0.8, 0.0]]])
    u = torch.tensor([[[0.5, 0.9, 0.9, 0.999], [0.01, 0.99, 0.5, 0.01], [0.3, 0.3, 0.3, 0.3]]])
    x = torch.tensor([[MASK, MASK, 0]])
    # position 0: q/g = [0.175/0.693, 0.05/0.105, 0.025/0.105, 0.25/0.001] -> MASK stays
    # position 1: q/g = [0.175/4.605, 0.05/0.01005, 0.025/0.693, 0.25/4.605] = [0.038, 4.975, 0.036, 0.054] -> 1
    # position 2: already revealed as 0, kept whatever is drawn
    hand = torch.tensor([[MASK, 1, 0]])
    assert torch.equal(ddpm_cache_update(x, 0.5, 0.25, p, MASK, u), hand)


def test_ddpm_cache_reveals_a_fraction_dt_over_t():
    """Each masked token is revealed with probability (t - s) / t, as MDLM's reverse process says."""
    n, vocab = 20000, 5
    p = torch.full((1, n, vocab), 1 / (vocab - 1))
    p[..., MASK] = 0
    x = torch.full((1, n), MASK)
    u = torch.rand(1, n, vocab, generator=torch.Generator().manual_seed(0))
    out = ddpm_cache_update(x, 0.8, 0.2, p, MASK, u)
    assert abs((out != MASK).float().mean().item() - 0.2 / 0.8) < 0.02


def test_subs_forces_revealed_tokens_and_never_predicts_mask():
    logits = torch.randn(1, 3, 4)
    logp = subs_log_probs(logits, torch.tensor([[MASK, 2, MASK]]), MASK)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(1, 3))
    assert logp[0, 1].argmax() == 2 and logp[0, 1, 2] == 0
    assert (logp[0, [0, 2], MASK] < -1e5).all()


class ToyDenoiser:
    """A fixed p(x0): the sentence [5, 6, 7, EOS, EOS, ...]; like a trained model, it is surest of the
    padding EOS (nearest first), then of the words (first word first)."""

    def __init__(self, length, vocab=10):
        target = [5, 6, 7] + [EOS] * (length - 3)
        self.logits = torch.full((1, length, vocab), -5.0)
        for i, tok in enumerate(target):
            self.logits[0, i, tok] = (6.0 if tok == EOS else 5.0) - 0.01 * i
        self.calls = 0
        self.seen = []

    def __call__(self, ids, rows=None):
        self.calls += 1
        self.seen.append(ids.clone())
        self.rows = rows
        return subs_log_probs(self.logits.expand(ids.shape[0], -1, -1), ids, MASK)


def test_confidence_sampler_never_unreveals_and_stops_at_eos():
    toy = ToyDenoiser(length=32)
    x = torch.full((1, 32), MASK)
    states = []
    out = sample_confidence(toy, x, MASK, EOS, steps=16, callback=lambda i, n, ids: states.append(ids.clone()))
    assert out[0, :3].tolist() == [5, 6, 7] and (out[0, 3:] == EOS).all()
    for before, after in zip(states, states[1:]):
        revealed = before != MASK
        assert torch.equal(after[revealed], before[revealed])  # never un-reveals
    # Step 1 commits ceil(32 / 16) = 2 positions, the EOS at 3 and 4, and the EOS fills the whole
    # tail at once; the three words then take ceil(3 / 15) = 1 step each: 4 passes, not 16.
    assert (states[0][0, 3:] == EOS).all() and (states[0][0, :3] == MASK).all()
    assert toy.calls == 4


def test_confidence_sampler_skips_finished_rows():
    toy = ToyDenoiser(length=8)
    x = torch.full((2, 8), MASK)
    x[1] = torch.tensor([5, 6, 7, EOS, EOS, EOS, EOS, MASK])  # nearly done: finishes in step 1
    out = sample_confidence(toy, x, MASK, EOS, steps=8)
    assert out[1].tolist() == [5, 6, 7] + [EOS] * 5
    assert toy.seen[0].shape[0] == 2 and toy.seen[-1].shape[0] == 1  # row 1 no longer computed
    assert toy.rows.tolist() == [0]


def test_confidence_sampler_keeps_the_frozen_prompt():
    toy = ToyDenoiser(length=12)
    x = torch.full((1, 12), MASK)
    x[0, 0] = 8  # a frozen prompt token, not what the toy would predict
    out = sample_confidence(toy, x, MASK, EOS, steps=4)
    assert out[0, 0] == 8 and (out != MASK).all()


def test_ddpm_cache_sampler_reuses_p_x0_while_nothing_changes():
    toy = ToyDenoiser(length=6)
    x = torch.full((1, 6), MASK)
    out = sample_ddpm_cache(toy, x, MASK, steps=64, generator=torch.Generator().manual_seed(0))
    assert out[0].tolist() == [5, 6, 7, EOS, EOS, EOS]
    changed = sum(not torch.equal(a, b) for a, b in zip(toy.seen, toy.seen[1:]))
    assert toy.calls == changed + 2  # one call per change, the first, and the final argmax
    assert toy.calls < 64 / 2
    assert math.isclose(len(toy.seen), toy.calls)
