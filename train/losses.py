"""The four UniAlignment losses: L = w_image L_image + l1 L_text + l2 L_cross + l3 L_align (defaults 1, 0.2, 0.05, 0.1).

Per micro-batch there are two forward passes of the transformer, as published:
  * the image pass: noisy target latents (+ condition latents for edit / perception / compose) with the prompt's
    T5 states at sigma -> velocity, final image states, block-k image states;
  * the text pass: the clean image at timestep 0 with T5 re-encoding the partly masked caption ids -> text logits,
    final text states, block-k text states (and image states, used when a batch has no target image).

Every random draw is made per sample from a generator seeded by (seed, micro-batch number, position in the global
batch, purpose) -- see `SampleRNG` -- so two processes with half the batch each draw exactly what one process with
the whole batch draws, and a resumed run draws what the uninterrupted run drew.

Sums over the batch are divided by *global* counts (see `Reducer`), so the mean of the per-process losses, which is
what DDP's gradient averaging optimises, equals the loss of the whole global batch. The contrastive loss takes its
negatives from the whole global batch (`loss.cross_negatives: global`) or, as the official training does, from each
process's own micro-batch (`local`).
"""

import zlib
from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from unialign_core.text_sampler import subs_log_probs

NUM_TRAIN_TIMESTEPS = 1000  # unshifted FlowMatchEulerDiscreteScheduler grid, as upstream samples it
MDLM_EPS = 1e-3  # MDLM sampling_eps (antithetic t) and the log-linear noise eps
CROSS_NEGATIVES = ("local", "global")  # loss.cross_negatives (see `contrastive_loss`)


# --------------------------------------------------------------------------------------------------------------
# The terms


@dataclass(frozen=True)
class Term:
    """One loss term. Its weight is `loss.<key>` in the config (default `weight`; `non_negative`: a weight below 0
    is refused); it is logged as `name` (metrics.jsonl, the progress bar; `loss/<name>` in TensorBoard). Its value
    is computed in `compute_losses` under `terms[name]`."""

    name: str
    key: str
    weight: float
    non_negative: bool = True


# A new term: an entry here and its value in `compute_losses` (the config's weight, the logs and the checks follow).
TERMS = (
    Term("image", "image", 1.0),  # L_image: rectified flow on the target latents
    Term("text", "text", 0.2),  # lambda1, L_text: MDLM on the caption ids
    Term("cross", "cross", 0.05),  # lambda2, L_cross: InfoNCE between pooled image and text states
    Term("align", "align", 0.1),  # lambda3, L_align: block states against the teacher's embeddings
)
LOGGED = ("loss",) + tuple(t.name for t in TERMS)  # the weighted total, then each term: the logs' and metrics' names


def weights(cfg) -> dict:
    """{term name: its weight in the `loss` section `cfg`}, in the order of `TERMS`."""
    return {t.name: getattr(cfg, t.key) for t in TERMS}


# --------------------------------------------------------------------------------------------------------------
# Randomness


class SampleRNG:
    """Per-sample random draws keyed by (seed, micro-batch number, global position, purpose).

    `positions` are the samples' positions in the global batch (rank * batch_size + i).
    """

    def __init__(self, seed: int, batch_no: int, positions: List[int], global_size: int):
        self.seed, self.batch_no = int(seed), int(batch_no)
        self.positions, self.global_size = [int(p) for p in positions], int(global_size)

    def _generator(self, position: int, purpose: str) -> torch.Generator:
        state = np.random.SeedSequence([self.seed, self.batch_no, position, zlib.crc32(purpose.encode())])
        hi, lo = state.generate_state(2, dtype=np.uint32)
        return torch.Generator("cpu").manual_seed((int(hi) << 32 | int(lo)) & 0x7FFF_FFFF_FFFF_FFFF)

    def generators(self, purpose: str) -> List[torch.Generator]:
        return [self._generator(p, purpose) for p in self.positions]

    def randn(self, purpose: str, shape) -> torch.Tensor:
        """[B, *shape] standard normal draws."""
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators(purpose)])

    def rand(self, purpose: str, shape=()) -> torch.Tensor:
        """[B, *shape] uniform [0, 1) draws."""
        return torch.stack([torch.rand(shape, generator=g) for g in self.generators(purpose)])


def sample_sigmas(rng: SampleRNG, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Logit-normal sigmas on the unshifted 1000-step flow-matching grid: sigma = (1000 - floor(1000 u)) / 1000."""
    u = torch.sigmoid(rng.randn("sigma", ()) * std + mean)
    index = (u * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
    return (NUM_TRAIN_TIMESTEPS - index).float() / NUM_TRAIN_TIMESTEPS


def train_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """The transformer's timestep for training sigmas, as the official training passes it: the unshifted
    scheduler's `sigma * 1000` in float32, not rounded (10 of the 1000 are up to 3.05e-5 off an integer)."""
    return sigmas.float() * NUM_TRAIN_TIMESTEPS


def antithetic_t(rng: SampleRNG) -> torch.Tensor:
    """MDLM's stratified t over the *global* batch: t_i = (1 - eps) ((u_i / n + i / n) mod 1) + eps."""
    n = rng.global_size
    offset = torch.tensor(rng.positions, dtype=torch.float32) / n
    u = rng.rand("mdlm_t")
    return (1 - MDLM_EPS) * ((u / n + offset) % 1) + MDLM_EPS


def log_linear_noise(t: torch.Tensor):
    """MDLM's log-linear schedule at times t: (move chance, loss weight). The move chance 1 - e^-sigma is
    (1 - eps) t and the weight sigma'(t) / (e^sigma - 1) is 1 / t; both are computed through
    sigma(t) = -log(1 - (1 - eps) t), as the official training computes them, so that they are its float32 values
    (1 / t itself differs in the last bit, which moves L_text by about 1e-6)."""
    sigma = -torch.log1p(-(1 - MDLM_EPS) * t)
    rate = (1 - MDLM_EPS) / (1 - (1 - MDLM_EPS) * t)
    return 1 - torch.exp(-sigma), rate / torch.expm1(sigma)


def mask_ids(ids: torch.Tensor, t: torch.Tensor, maskable: torch.Tensor, mask_id: int, rng: SampleRNG):
    """Mask each maskable position with probability (1 - eps) t (the log-linear schedule's move chance)."""
    move, _ = log_linear_noise(t)
    u = rng.rand("mdlm_mask", (ids.shape[1],)).to(ids.device)
    moved = (u < move.to(ids.device)[:, None]) & maskable
    return torch.where(moved, torch.full_like(ids, mask_id), ids), moved


# --------------------------------------------------------------------------------------------------------------
# Reductions across processes


class Reducer:
    """Global counts and gathers for the losses; the default is one process.

    `all_sum(x)` sums a tensor over processes (no gradient); `gather(x)` concatenates a tensor's first dimension
    over processes (no gradient; same size on every process, use `pad` for ragged ones); `rank` and `world`.
    """

    def __init__(self, all_sum: Optional[Callable] = None, gather: Optional[Callable] = None, rank=0, world=1):
        self.all_sum = all_sum or (lambda x: x)
        self._gather = gather or (lambda x: x)
        self.rank, self.world = rank, world

    def mean_divisor(self, local_count: torch.Tensor) -> torch.Tensor:
        """Global count / world: dividing a local sum by it makes the mean over processes the global mean."""
        return (self.all_sum(local_count.detach().float()) / self.world).clamp_min(1e-12)

    def gather_with_grad(self, x: torch.Tensor) -> torch.Tensor:
        """All processes' rows; this process's rows keep their gradient."""
        if self.world == 1:
            return x
        parts = list(self._gather(x.detach().contiguous()).chunk(self.world))
        parts[self.rank] = x
        return torch.cat(parts)


# --------------------------------------------------------------------------------------------------------------
# The losses


def image_flow_loss(velocity, x0, noise, sigmas, weight, reducer: Reducer, target: str = "x0"):
    """Rectified flow, per sample, averaged over valid samples.

    target "x0" (as upstream): MSE between the predicted x0 (x_t - sigma v) and x0, i.e. the velocity error
    weighted by sigma^2; "velocity": MSE between v and its target noise - x0 (every sigma weighted alike).
    """
    if target == "velocity":
        per_sample = ((velocity.float() - (noise.float() - x0.float())) ** 2).flatten(1).mean(1)
        return (per_sample * weight).sum() / reducer.mean_divisor(weight.sum())
    s = sigmas.view(-1, *[1] * (x0.ndim - 1)).to(velocity.dtype)
    x_t = (1 - s) * x0 + s * noise
    pred_x0 = velocity * (-s) + x_t
    per_sample = ((pred_x0.float() - x0.float()) ** 2).flatten(1).mean(1)
    return (per_sample * weight).sum() / reducer.mean_divisor(weight.sum())


def text_mdlm_loss(logits, ids, xt, t, count_mask, mask_id: int, reducer: Reducer):
    """MDLM with SUBS: -log p(x0 | x_t) / t (the weight of `log_linear_noise`) at masked positions, summed and
    divided by the (global) count of positions in `count_mask` (all positions of valid captions as upstream, or only
    non-padding ones)."""
    logp = subs_log_probs(logits.float(), xt, mask_id)
    _, weight = log_linear_noise(t.to(logp.device))
    nll = -logp.gather(-1, ids[..., None]).squeeze(-1) * weight[:, None]
    nll = nll * (xt == mask_id) * count_mask
    return nll.sum() / reducer.mean_divisor(count_mask.sum())


def contrastive_gradient_factor(negatives: str, reducer: Reducer) -> int:
    """What `contrastive_loss` multiplies its loss by (the number of processes for global negatives, else 1)."""
    return reducer.world if negatives == "global" else 1


def contrastive_loss(image_states, text_states, valid, temperature: float, reducer: Reducer, negatives="global"):
    """Symmetric InfoNCE between mean-pooled final image and text states of matching pairs.

    negatives "global": over the whole global batch (features gathered from all processes). Returns the loss of
    the whole batch multiplied by the number of processes: each process back-propagates into its own rows only,
    and DDP averages the gradients, so the factor makes the update that of the whole batch.
    negatives "local" (the official training): over this process's micro-batch alone; DDP's average of the
    gradients is then the mean of the processes' losses, as in the official training.
    """
    if negatives not in CROSS_NEGATIVES:
        raise ValueError(f"loss.cross_negatives: must be one of {', '.join(CROSS_NEGATIVES)}, got {negatives!r}")
    img = F.normalize(image_states.float().mean(1), dim=-1)
    txt = F.normalize(text_states.float().mean(1), dim=-1)
    keep = valid.bool()
    if negatives == "global" and reducer.world > 1:
        img, txt = reducer.gather_with_grad(img), reducer.gather_with_grad(txt)
        keep = reducer.gather_with_grad(valid.float()).bool()
    img, txt = img[keep], txt[keep]
    if img.shape[0] < 2:
        return (image_states.sum() + text_states.sum()) * 0.0  # nothing to contrast
    logits = img @ txt.T / temperature
    labels = torch.arange(logits.shape[0], device=logits.device)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return loss * contrastive_gradient_factor(negatives, reducer)


def align_loss(projected, teacher, valid, reducer: Reducer):
    """1 - cos between projected block states and teacher embeddings, averaged over valid samples."""
    cos = F.cosine_similarity(projected.float(), teacher.float().to(projected.device), dim=-1)
    return ((1 - cos) * valid).sum() / reducer.mean_divisor(valid.sum())


# --------------------------------------------------------------------------------------------------------------
# The module DDP / FSDP / DeepSpeed wrap: both passes and the alignment projections in one forward


class TrainModule(nn.Module):
    """Wraps the transformer so one `forward` runs everything that needs gradients."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, image_pass: Optional[dict], text_pass: Optional[dict], block: Optional[int], align: bool):
        out = {}
        img_block = txt_block = None
        if image_pass is not None:
            o = self.transformer(
                image_pass["x_t"],
                image_pass["context"],
                image_pass["timestep"],
                image_pass["conditions"],
                return_block=block,
                compute_text=False,
            )
            out["velocity"], out["image_states"] = o.velocity, o.image_states
            img_block = o.block_image_states
        if text_pass is not None:
            o = self.transformer(
                text_pass["latents"],
                text_pass["context"],
                text_pass["timestep"],
                return_block=block,
                compute_image=image_pass is None,
            )
            out["text_logits"], out["text_states"] = o.text_logits, o.text_states
            txt_block = o.block_text_states
            if image_pass is None:  # caption / vqa batches: the clean image's states stand in
                out["image_states"], img_block = o.image_states, o.block_image_states
        if align and img_block is not None and txt_block is not None:
            out["align_image"], out["align_text"] = self.transformer.project_for_alignment(img_block, txt_block)
        return out


@dataclass
class Prepared:
    """One micro-batch with everything the frozen encoders produce (see `batch.prepare_batch`)."""

    target: Optional[torch.Tensor]  # [B, C, h, w] clean target latents, or None (caption / vqa)
    conditions: List[torch.Tensor]  # condition latents (edit source, perception source, compose references)
    prompt_context: Optional[torch.Tensor]  # [B, L, D] T5 states of the prompt / instruction
    null_context: torch.Tensor  # [1, L, D] T5 states of " " (text dropout)
    understand: torch.Tensor  # [B, C, h, w] the clean image the caption describes (target, else source 0)
    ids: torch.Tensor  # [B, L] caption / answer ids, padded with EOS
    maskable: torch.Tensor  # [B, L] bool: positions that may be masked (VQA questions stay visible)
    not_pad: torch.Tensor  # [B, L] bool: non-padding positions (the first EOS counts)
    caption_valid: torch.Tensor  # [B] bool: the sample has a caption (and is real)
    sample_valid: torch.Tensor  # [B] bool: False for padding samples that only even out ragged batches
    teacher_image: Optional[torch.Tensor] = None  # [B, D_teacher]
    teacher_text: Optional[torch.Tensor] = None  # [B, D_teacher]


def compute_losses(
    module,
    batch: Prepared,
    rng: SampleRNG,
    cfg,
    encode_ids: Callable,
    mask_id: int,
    reducer: Reducer = None,
    block: Optional[int] = None,
):
    """All loss terms of one micro-batch. Returns (total for backward, {term: detached value for logging}).

    `cfg` is the `loss` section (weights, temperature, text_dropout, logit_mean/std, ignore_padding,
    cross_negatives);
    `encode_ids` maps token ids to T5 states (no gradient); `module` is a (wrapped) `TrainModule`.
    """
    reducer = reducer or Reducer()
    device = batch.ids.device
    need_text = cfg.text > 0 or cfg.cross > 0 or cfg.align > 0
    align = cfg.align > 0 and batch.teacher_image is not None

    image_pass = noise = sigmas = None
    if batch.target is not None and (cfg.image > 0 or cfg.cross > 0 or align):
        x0 = batch.target
        sigmas = sample_sigmas(rng, cfg.logit_mean, cfg.logit_std).to(device)
        noise = rng.randn("noise", x0.shape[1:]).to(device, x0.dtype)
        s = sigmas.view(-1, 1, 1, 1).to(x0.dtype)
        drop = (rng.rand("text_dropout") < cfg.text_dropout).to(device)
        context = torch.where(drop[:, None, None], batch.null_context.to(batch.prompt_context), batch.prompt_context)
        image_pass = {
            "x_t": (1 - s) * x0 + s * noise,
            "context": context,
            "timestep": train_timesteps(sigmas),
            "conditions": batch.conditions,
        }

    text_pass = xt = t = None
    if need_text:
        t = antithetic_t(rng)
        xt, _ = mask_ids(batch.ids, t, batch.maskable & batch.caption_valid[:, None], mask_id, rng)
        with torch.no_grad():
            context = encode_ids(xt)
        text_pass = {
            "latents": batch.understand,
            "context": context,
            "timestep": torch.zeros(batch.ids.shape[0], device=device),
        }

    out = module(image_pass, text_pass, block if align else None, align)
    zero = torch.zeros((), device=device)
    terms = {t.name: zero for t in TERMS}
    valid = batch.caption_valid.float().to(device)
    present = batch.sample_valid.float().to(device)
    if image_pass is not None:
        terms["image"] = image_flow_loss(
            out["velocity"], batch.target, noise, sigmas, present, reducer, cfg.image_target
        )
    if text_pass is not None:
        count = (batch.not_pad if cfg.ignore_padding else torch.ones_like(batch.not_pad)) & batch.maskable
        count = count & batch.caption_valid[:, None]
        terms["text"] = text_mdlm_loss(out["text_logits"], batch.ids, xt, t, count.float(), mask_id, reducer)
        if cfg.cross > 0 and "image_states" in out:
            terms["cross"] = contrastive_loss(
                out["image_states"], out["text_states"], valid, cfg.temperature, reducer, cfg.cross_negatives
            )
    if align and "align_image" in out:
        terms["align"] = align_loss(out["align_image"], batch.teacher_image, present, reducer) + align_loss(
            out["align_text"], batch.teacher_text, valid, reducer
        )
    weight = weights(cfg)
    total = sum(weight[k] * v for k, v in terms.items())
    logged = {k: v.detach().float() for k, v in terms.items()}
    # the logged value without the gradient factor
    logged["cross"] = logged["cross"] / contrastive_gradient_factor(cfg.cross_negatives, reducer)
    logged["loss"] = sum(weight[k] * v for k, v in logged.items())
    return total, logged
