"""The four losses on a fixed batch (tiny golden model, tiny CLIP teacher): each alone and all together change the
parameters and fall over a few steps; randomness is per sample; VQA questions stay visible; caches are exact."""

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch

import train_helpers as H
from tiny_models import GOLDEN
from train import data as D
from train.batch import Encoders, pad_batch, prepare_batch
from train.config import InitConfig, LossConfig, load_config
from train.feature_cache import FeatureCache
from train.init import load_start
from train.losses import Reducer, SampleRNG, TrainModule, antithetic_t, compute_losses, sample_sigmas, text_mdlm_loss
from train.records import load_records
from train.teacher import CachedTeacher, Teacher
from unialign_core.model import caption_ids


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("losses")
    teacher = CachedTeacher(Teacher.load(H.make_teacher(tmp / "clip")), FeatureCache(tmp / "cache"))
    data = H.make_dataset(tmp / "data", tasks=("edit",), per_task=4)
    cfg = load_config(
        H.write_config(
            tmp / "c.yaml",
            H.base_config(
                tmp,
                data,
                loss={"align": 0.1},
                teacher={"path": str(tmp / "clip"), "block": 2},
                data={"cache_dir": str(tmp / "cache")},
            ),
        )
    )
    torch.manual_seed(0)
    bundle, transformer, _ = load_start(InitConfig(path=str(GOLDEN)), align_dim=teacher.dim)
    base = copy.deepcopy(transformer.state_dict())
    enc = Encoders(bundle, torch.device("cpu"), torch.float32, torch.float32, cfg, teacher)
    records, _ = load_records([data])
    dataset = D.UniDataset(records, 32, [(32, 32)])
    batch = pad_batch(D.collate([dataset[i] for i in range(4)]), 4)
    rng = SampleRNG(0, 0, [0, 1, 2, 3], 4)
    prepared = prepare_batch(batch, enc, rng, need_teacher=True)
    return SimpleNamespace(
        bundle=bundle, transformer=transformer, base=base, enc=enc, prepared=prepared, batch=batch, cfg=cfg, tmp=tmp
    )


WEIGHTS = {
    "image": dict(image=1.0, text=0.0, cross=0.0, align=0.0),
    "text": dict(image=0.0, text=1.0, cross=0.0, align=0.0),
    "cross": dict(image=0.0, text=0.0, cross=1.0, align=0.0),
    "align": dict(image=0.0, text=0.0, cross=0.0, align=1.0),
    "all": dict(image=1.0, text=0.2, cross=0.05, align=0.1),
}


@pytest.mark.parametrize("which", list(WEIGHTS))
def test_each_loss_and_all_fall_on_a_fixed_batch(setup, which):
    s = setup
    s.transformer.load_state_dict(s.base)
    module = TrainModule(s.transformer).train()
    cfg = LossConfig(**WEIGHTS[which], text_dropout=0.0)
    params = [p for p in s.transformer.parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in s.transformer.named_parameters()}
    opt = torch.optim.Adam(params, lr=2e-3)
    history = []
    for _ in range(6):
        rng = SampleRNG(0, 7, [0, 1, 2, 3], 4)  # the same draws every step: a fixed objective
        total, logged = compute_losses(
            module, s.prepared, rng, cfg, s.enc.encode_ids, s.bundle.mask_id, Reducer(), block=2
        )
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(float(total.detach()))
        key = which if which != "all" else "loss"
        assert float(logged[key]) > 0
        assert abs(float(logged["loss"]) - history[-1]) < 1e-5 * max(1.0, history[-1])
    assert history[-1] < history[0], history
    changed = {n for n, p in s.transformer.named_parameters() if not torch.equal(p, before[n])}
    assert changed
    heads = {
        "image": "image_proj_out.weight",
        "text": "text_proj_out.weight",
        "align": "siglip_adapter_img.fc.0.weight",
    }
    if which in heads:
        assert heads[which] in changed
    if which == "align":  # only blocks up to the aligned one (2 of 3) get gradients
        assert not any(n.startswith("transformer_blocks.2.") for n in changed)
    if which == "all":
        assert {"image_proj_out.weight", "text_proj_out.weight", "siglip_adapter_text.fc.2.weight"} <= changed


def test_per_sample_randomness_splits_across_processes():
    whole = SampleRNG(3, 11, [0, 1, 2, 3], 4)
    halves = [SampleRNG(3, 11, [0, 1], 4), SampleRNG(3, 11, [2, 3], 4)]
    assert torch.equal(whole.randn("noise", (2, 3)), torch.cat([h.randn("noise", (2, 3)) for h in halves]))
    assert torch.equal(sample_sigmas(whole), torch.cat([sample_sigmas(h) for h in halves]))
    assert torch.equal(antithetic_t(whole), torch.cat([antithetic_t(h) for h in halves]))
    assert not torch.equal(whole.randn("noise", (2,)), SampleRNG(3, 12, [0, 1, 2, 3], 4).randn("noise", (2,)))
    # antithetic t: one draw per stratum of the global batch
    t = antithetic_t(SampleRNG(0, 0, list(range(8)), 8))
    strata = ((t - 1e-3) / (1 - 1e-3) * 8).floor().long()
    assert sorted(strata.tolist()) == list(range(8))
    sig = sample_sigmas(SampleRNG(0, 0, list(range(64)), 64))
    assert ((sig > 0) & (sig <= 1)).all() and ((sig * 1000 - (sig * 1000).round()).abs() < 1e-3).all()


def test_vqa_question_is_never_masked_and_padding_option(setup):
    tok = setup.bundle.tokenizer
    ids, maskable, not_pad = caption_ids(tok, "vqa", "what colour?", "red", 16)
    prompt = tok("Q: what colour? A: ")["input_ids"][:-1]
    assert ids[: len(prompt)] == prompt and not any(maskable[: len(prompt)]) and all(maskable[len(prompt) :])
    assert ids[len(prompt) : len(prompt) + 2] == tok("red")["input_ids"]
    assert sum(not_pad) == len(prompt) + 2 and ids[-1] == tok.eos_token_id
    long_ids, _, long_pad = caption_ids(tok, "caption", "", "word " * 40, 16)
    assert len(long_ids) == 16 and long_ids[-1] == tok.eos_token_id and all(long_pad)

    # L_text by hand: uniform logits give -log p = log(V - 1) at masked positions (the mask id is excluded)
    vocab, mask = 10, 9
    ids = torch.tensor([[3, 4, 5, 1, 1, 1]])  # 3 tokens, EOS, 2 padding EOS
    xt = torch.tensor([[3, mask, 5, mask, 1, mask]])
    t = torch.tensor([0.5])
    not_pad = torch.tensor([[1, 1, 1, 1, 0, 0]]).float()
    logits = torch.zeros(1, 6, vocab)
    per_token = torch.log(torch.tensor(vocab - 1.0)) / 0.5
    upstream = text_mdlm_loss(logits, ids, xt, t, torch.ones(1, 6), mask, Reducer())
    ignoring = text_mdlm_loss(logits, ids, xt, t, not_pad, mask, Reducer())
    assert torch.allclose(upstream, 3 * per_token / 6) and torch.allclose(ignoring, 2 * per_token / 4)


def test_feature_caches_are_exact(setup):
    s = setup
    rng = SampleRNG(0, 0, [0, 1, 2, 3], 4)
    again = prepare_batch(s.batch, s.enc, rng, need_teacher=True)  # every feature now comes from the cache
    for field in dataclasses.fields(again):
        a, b = getattr(again, field.name), getattr(s.prepared, field.name)
        if torch.is_tensor(a):
            assert torch.equal(a, b), field.name
    assert torch.equal(again.conditions[0], s.prepared.conditions[0])
    assert s.enc.teacher.hits >= 8
    files = [p for p in (s.tmp / "cache").rglob("*.safetensors")]
    assert len(files) >= 4 + 4 + 4  # VAE moments, T5 prompt states, teacher features
