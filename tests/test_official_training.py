"""Training as the official code trains: the loss parity test against golden numbers made by running the official
training code (tests/data/official_training/README.md), and one test for each rule around the losses that the
official training fixes (github glimmer16/UniAlignment, issue 19):

1. prompts, the " " of text dropout and captions are padded with </s> in training, with <pad> in inference;
2. text-to-image batches draw two independent VAE samples, one for the image pass and one for the text pass;
3. the micro-batches' gradients are summed before the clip (train.grad_accum_reduce: sum);
4. the contrastive negatives come from each process's micro-batch (loss.cross_negatives: local) or from all;
5. the timesteps are the scheduler's sigma * 1000 in float32, not rounded.
"""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import train_helpers as H
from tiny_models import DATA, GOLDEN, REPO
from train.batch import Encoders, prepare_batch
from train.config import Config, ConfigError, DataConfig, InitConfig, LossConfig, load_config
from train.data import Batch
from train.init import add_projectors, load_start
from train.losses import (
    NUM_TRAIN_TIMESTEPS,
    Prepared,
    Reducer,
    SampleRNG,
    TrainModule,
    compute_losses,
    contrastive_loss,
    sample_sigmas,
    train_timesteps,
)
from unialign_core.model import PROMPT_PADDING, caption_ids, pad_id

OFFICIAL = DATA / "official_training"
TERM_TOL = 1e-6  # each loss term and the total
GRAD_TOL = 1e-6  # every gradient entry (gradients are of order 1e-2 here)
MINIMAL = ["init.path=x", "data.files=[x]", "loss.align=0"]  # the least a config needs to load


class Replay(SampleRNG):
    """The official code's recorded draws, handed out by the purpose that draws them here; notes what was used."""

    def __init__(self, draws: dict, batch_size: int):
        super().__init__(0, 0, list(range(batch_size)), batch_size)
        self.draws, self.used = draws, []

    def randn(self, purpose, shape=()):
        value = self.draws[purpose]
        assert tuple(value.shape[1:]) == tuple(shape), (purpose, value.shape, shape)
        self.used.append(purpose)
        return value.clone()

    rand = randn


@pytest.fixture(scope="module")
def golden():
    with open(OFFICIAL / "golden.json", encoding="utf-8") as f:
        meta = json.load(f)
    return SimpleNamespace(meta=meta, tensors=load_file(str(OFFICIAL / "golden.safetensors")))


@pytest.fixture(scope="module")
def model(golden):
    meta, tensors = golden.meta, golden.tensors
    bundle, transformer, _ = load_start(InitConfig(path=str(GOLDEN)))
    projector = {k[len("projector.") :]: v for k, v in tensors.items() if k.startswith("projector.")}
    hidden = projector["siglip_adapter_img.fc.0.weight"].shape[0]
    add_projectors(transformer, meta["teacher_dim"], hidden=hidden)
    missing, unexpected = transformer.load_state_dict(projector, strict=False)
    assert not unexpected and not [k for k in missing if k.startswith("siglip_adapter_")]
    cfg = Config(data=DataConfig(text_length=meta["text_length"]))
    enc = Encoders(bundle, torch.device("cpu"), torch.float32, torch.float32, cfg)
    return SimpleNamespace(bundle=bundle, transformer=transformer.train(), enc=enc)


def golden_batch(golden, kind):
    meta, t = golden.meta, golden.tensors
    texts = meta["texts"][kind]
    n = meta["batch_size"]
    target = t[f"pixels.{kind}.target"].float() / 255
    sources = [t["pixels.edit.source0"].float() / 255] if kind == "edit" else []
    return Batch(
        task=kind,
        target=target,
        sources=sources,
        text=list(texts["text"]),
        caption=list(texts["caption"]),
        index=list(range(n)),
        present=[True] * n,
    )


def draws(golden, kind):
    prefix = f"{kind}.draw."
    return {k[len(prefix) :]: v for k, v in golden.tensors.items() if k.startswith(prefix)}


def run_ours(golden, model, kind, loss_cfg):
    meta, t = golden.meta, golden.tensors
    rng = Replay(draws(golden, kind), meta["batch_size"])
    prepared = prepare_batch(golden_batch(golden, kind), model.enc, rng, need_teacher=False)
    prepared.teacher_image, prepared.teacher_text = t[f"{kind}.teacher_image"], t[f"{kind}.teacher_text"]
    model.transformer.zero_grad(set_to_none=True)
    total, logged = compute_losses(
        TrainModule(model.transformer),
        prepared,
        rng,
        loss_cfg,
        model.enc.encode_ids,
        model.bundle.mask_id,
        Reducer(),
        block=meta["block"],
    )
    total.backward()
    grads = {n: p.grad for n, p in model.transformer.named_parameters() if p.grad is not None}
    return total, logged, grads, prepared, rng


# --------------------------------------------------------------------------------------------------------------
# The golden batches


@pytest.mark.parametrize("kind", ["t2i", "edit"])
def test_losses_and_gradients_equal_the_official_training(golden, model, kind):
    meta, t = golden.meta, golden.tensors
    official = meta["batches"][kind]
    assert official["dropped"] > 0  # the golden batch drops a prompt to the " " of text dropout
    loss_cfg = LossConfig(cross_negatives="local")  # the published weights; one process
    total, logged, grads, prepared, rng = run_ours(golden, model, kind, loss_cfg)

    # every draw of the official code is made here, once, for the same purpose (t2i: two VAE samples)
    assert sorted(rng.used) == sorted(draws(golden, kind))
    # the token ids the official training fed T5: captions and (in the text pass) the prompts, padded with </s>
    assert torch.equal(prepared.ids, t[f"{kind}.ids.caption"])

    expected = {
        "image": official["image"],
        "text": official["text"],
        "cross": official["cross"],
        "align": official["align_image"] + official["align_text"],
        "loss": official["loss"],
    }
    for term, value in expected.items():
        assert abs(float(logged[term]) - value) <= TERM_TOL, (term, float(logged[term]), value)
    assert abs(total.item() - official["loss"]) <= TERM_TOL

    rows = t[f"{kind}.grad_rows_index"]
    compared = 0
    for name, grad in grads.items():
        if name == "text_proj_out.weight":
            want = t[f"{kind}.grad_rows.{name}"]
            assert (grad[rows] - want).abs().max() <= GRAD_TOL, name
            assert abs(float(grad.norm()) - official["text_proj_out_weight_grad_norm"]) <= GRAD_TOL
        else:
            want = t[f"{kind}.grad.{name}"]
            assert (grad - want).abs().max() <= GRAD_TOL, (name, float((grad - want).abs().max()))
        compared += 1
    official_names = {k.split(".", 2)[2] for k in t if k.startswith((f"{kind}.grad.", f"{kind}.grad_rows."))}
    assert set(grads) == official_names and compared == len(official_names)
    norm = sum(float(g.norm() ** 2) for g in grads.values()) ** 0.5
    assert abs(norm - official["grad_norm"]) <= GRAD_TOL


# --------------------------------------------------------------------------------------------------------------
# 1. Padding: training pads with </s>, inference with <pad>


def test_prompt_padding_training_and_inference(golden, model):
    meta, t = golden.meta, golden.tensors
    bundle, length = model.bundle, meta["text_length"]
    assert PROMPT_PADDING == ("inference", "training")
    for kind in ("t2i", "edit"):
        prompts = meta["texts"][kind]["text"]
        training = bundle.tokenize(prompts, length, padding="training")
        assert torch.equal(training, t[f"{kind}.ids.prompt"])  # the official training's prompt ids
        inference = bundle.tokenize(prompts, length)  # the default: the official pipeline's
        reference = bundle.tokenizer(prompts, padding="max_length", max_length=length, truncation=True)
        assert inference.tolist() == reference["input_ids"]
        padded = torch.tensor(reference["attention_mask"]) == 0
        assert padded.any() and (inference[padded] == 0).all() and (training[padded] == 1).all()
        assert torch.equal(inference[~padded], training[~padded])
    assert torch.equal(bundle.tokenize([" "], length, padding="training"), t["null_ids"])
    # the trainer's prompt states and its " " of text dropout are those of the training padding
    assert torch.equal(model.enc.null_context, bundle.encode_prompts([" "], length, padding="training"))
    assert not torch.equal(model.enc.null_context, bundle.encode_prompts([" "], length))
    # captions are padded by the same rule
    ids, _, not_pad = caption_ids(bundle.tokenizer, "caption", "", "a red fox", length)
    assert ids[sum(not_pad) :] == [pad_id(bundle.tokenizer, "training")] * (length - sum(not_pad))
    with pytest.raises(ValueError, match="padding: must be one of inference, training"):
        bundle.tokenize(["a"], length, padding="eos")


# --------------------------------------------------------------------------------------------------------------
# 2. VAE samples: two for text-to-image, one shared by both passes otherwise


def test_text_to_image_draws_two_vae_samples(golden, model):
    rng = SampleRNG(0, 0, [0, 1, 2], 3)
    t2i = prepare_batch(golden_batch(golden, "t2i"), model.enc, rng, need_teacher=False)
    assert t2i.understand is not t2i.target and not torch.allclose(t2i.understand, t2i.target)
    mean, std = model.enc.moments(golden_batch(golden, "t2i").target)
    for latents, purpose in ((t2i.target, "vae_target"), (t2i.understand, "vae_understand")):
        z = mean + std * rng.randn(purpose, mean.shape[1:])
        assert torch.equal(latents, model.bundle.scale_latents(z))
    edit = prepare_batch(golden_batch(golden, "edit"), model.enc, rng, need_teacher=False)
    assert edit.understand is edit.target  # the edited image: one sample for both passes, as published
    assert not torch.equal(edit.conditions[0], edit.target)


# --------------------------------------------------------------------------------------------------------------
# 3. Gradient accumulation: summed (official) or averaged


def test_grad_accum_reduce_sum_is_grad_accum_times_the_mean(tmp_path):
    data = H.make_dataset(tmp_path / "data", tasks=("t2i",), per_task=4)
    norms = {}
    for reduce in ("sum", "mean"):
        train = {"max_steps": 1, "grad_accum": 2, "batch_size": 2, "grad_accum_reduce": reduce, "grad_clip": 1e9}
        cfg = H.base_config(tmp_path / reduce, data, train=train)
        norms[reduce] = H.train_in_process(cfg, tmp_path, name=f"{reduce}.yaml")["grad_norm"]
    # the same micro-batches and draws: the summed gradient (clipped at train.grad_clip) is twice the averaged one
    assert norms["sum"] == pytest.approx(2 * norms["mean"], rel=1e-5)
    assert load_config(None, MINIMAL).train.grad_accum_reduce == "sum"
    with pytest.raises(ConfigError, match="train.grad_accum_reduce: must be one of sum, mean, got 'avg'"):
        load_config(None, MINIMAL + ["train.grad_accum_reduce=avg"])


# --------------------------------------------------------------------------------------------------------------
# 4. Contrastive negatives: local (official) or global


def test_cross_negatives_local_and_global():
    # this process (rank 0 of 2) holds samples 0 and 1; the other process holds two more, whose pooled image and
    # text features are the unit vectors e2 and e3
    image, text = torch.eye(4)[:2, None, :] * 3, torch.eye(4)[:2, None, :] + 0.5
    others = torch.eye(4)[2:, None, :]
    valid = torch.ones(2, dtype=torch.bool)

    def gather(x):  # all processes' rows: this one's, then the other's
        return torch.cat([x, others[:, 0] if x.ndim == 2 else torch.ones(2)])

    two = Reducer(gather=gather, rank=0, world=2)
    local = contrastive_loss(image, text, valid, 0.5, two, "local")
    assert torch.equal(local, contrastive_loss(image, text, valid, 0.5, Reducer(), "local"))  # no gather, no factor
    whole = contrastive_loss(
        torch.cat([image, others]), torch.cat([text, others]), torch.ones(4, dtype=torch.bool), 0.5, Reducer()
    )
    assert torch.allclose(contrastive_loss(image, text, valid, 0.5, two, "global"), 2 * whole)  # times 2 processes
    assert not torch.allclose(local, whole)
    with pytest.raises(ValueError, match="loss.cross_negatives: must be one of local, global, got 'all'"):
        contrastive_loss(image, text, valid, 0.5, Reducer(), "all")
    assert LossConfig().cross_negatives == "global"
    official = load_config(str(REPO / "train" / "configs" / "official.yaml"))
    assert official.loss.cross_negatives == "local" and official.train.grad_accum_reduce == "sum"
    with pytest.raises(ConfigError, match="loss.cross_negatives: must be one of local, global, got 'all'"):
        load_config(None, MINIMAL + ["loss.cross_negatives=all"])


# --------------------------------------------------------------------------------------------------------------
# 5. Timesteps: the scheduler's values, not rounded


class CaptureTimestep(torch.nn.Module):
    """A stand-in for the TrainModule that keeps the timestep of the image pass."""

    def forward(self, image_pass, text_pass, block, align):
        self.timestep = image_pass["timestep"]
        return {"velocity": torch.zeros_like(image_pass["x_t"]), "image_states": None}


def test_timesteps_are_the_official_schedulers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler()  # the official training's: unshifted, 1000 steps
    index = torch.arange(NUM_TRAIN_TIMESTEPS)
    sigmas = (NUM_TRAIN_TIMESTEPS - index).float() / NUM_TRAIN_TIMESTEPS  # sample_sigmas' grid
    assert torch.equal(sigmas, scheduler.sigmas[index])
    ours = train_timesteps(sigmas)
    assert torch.equal(ours, scheduler.timesteps[index])
    off = (ours - ours.round()).abs()
    assert int((off > 0).sum()) == 10 and float(off.max()) == pytest.approx(3.05e-5, abs=1e-7)

    # and the image pass hands exactly these to the transformer
    n = 64
    x0, ones = torch.zeros(n, 1, 2, 2), torch.ones(n, 1, dtype=torch.bool)
    prepared = Prepared(
        target=x0,
        conditions=[],
        prompt_context=torch.zeros(n, 1, 1),
        null_context=torch.zeros(1, 1, 1),
        understand=x0,
        ids=torch.zeros(n, 1, dtype=torch.long),
        maskable=ones,
        not_pad=ones,
        caption_valid=ones[:, 0],
        sample_valid=ones[:, 0],
    )
    module, rng = CaptureTimestep(), SampleRNG(0, 0, list(range(n)), n)
    compute_losses(module, prepared, rng, LossConfig(text=0.0, cross=0.0, align=0.0), None, 0)
    assert torch.equal(module.timestep, train_timesteps(sample_sigmas(rng)))
