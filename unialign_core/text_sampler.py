"""Masked discrete diffusion for the text stream (captions and answers).

Every denoiser call, as published:
  1. the partly masked ids go through T5 (no attention mask);
  2. the transformer runs on the clean image latents at timestep 0;
  3. the mask token's logit gets -1e6, then log_softmax;
  4. positions already revealed are forced to their own token (SUBS).

Two samplers:
  * `sample_ddpm_cache`: MDLM's "ddpm_cache" sampler, reproduced exactly.
  * `sample_confidence`: commits the most confident masked positions each step (LLaDA-style),
    fills everything after a committed end-of-text with padding at once (those positions
    cannot change the decoded text), and stops as soon as nothing is masked. With a `threshold`
    it also commits, in the same step, every masked position at least that probable.

Two denoisers: `TextDenoiser` (every call a full pass, as published) and `CachedTextDenoiser`,
which runs the full pass every `refresh` calls only and, in between, the text tokens alone
against the image keys and values cached by the last full pass (refresh=1: exactly TextDenoiser).
"""

import math
from typing import Callable, Optional

import torch

from .errors import InputError
from .flow_sampler import check_cancel

NEG_INF = -1000000.0
EPS = 1e-5  # the end of MDLM's time grid


class TextDenoiser:
    """SUBS log-probabilities p(x0 | x_t) for token ids, given one clean image (or none)."""

    total_calls = 0  # forward passes by all denoisers, for benchmarks

    def __init__(self, model, latents: Optional[torch.Tensor]):
        self.model = model
        self.latents = latents

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Log-probs for `ids`; `rows` picks which images of the batch these ids belong to."""
        TextDenoiser.total_calls += 1
        context = self.model.encode_ids(ids)
        zero = torch.zeros(ids.shape[0], device=context.device)
        out = self._forward(context, zero, rows)
        return subs_log_probs(out.text_logits.float(), ids.to(out.text_logits.device), self.model.mask_id)

    def _forward(self, context: torch.Tensor, zero: torch.Tensor, rows: Optional[torch.Tensor]):
        """The transformer's output for the T5 states `context` at timestep `zero` (a full pass)."""
        latents = self.latents if rows is None or self.latents is None else self.latents[rows.to(self.latents.device)]
        return self.model.transformer(latents, context, zero, compute_image=False)


class CachedTextDenoiser(TextDenoiser):
    """TextDenoiser that reuses the image stream: a full pass every `refresh` calls, text-only passes between.

    The image tokens are clean and the timestep is 0 throughout, so the image stream's keys and values
    change only through the text they attend to; the text-only passes reuse those of the last full pass
    (an approximation for refresh > 1, measured in the README). refresh=1 gives TextDenoiser's numbers.
    """

    def __init__(self, model, latents: Optional[torch.Tensor], refresh: int = 1):
        super().__init__(model, latents)
        if int(refresh) != refresh or refresh < 1:
            raise InputError(
                "refresh", f"must be a whole number of steps, at least 1 (1 = exact); got {refresh}", sep=" "
            )
        self.refresh = int(refresh)
        self.calls = 0
        self.full_passes = 0
        self.cache = None
        self.cache_rows = None  # which images of the batch the cache rows belong to

    def _forward(self, context: torch.Tensor, zero: torch.Tensor, rows: Optional[torch.Tensor]):
        """A full pass that caches the image stream, or a text-only pass over the cache (`TextDenoiser.__call__`
        runs it without gradients)."""
        rows = torch.arange(context.shape[0]) if rows is None else rows.cpu()
        cached = self._cached_rows(rows) if self.calls % self.refresh else None
        self.calls += 1
        transformer = self.model.transformer
        if cached is None:
            latents = None if self.latents is None else self.latents[rows.to(self.latents.device)]
            out, self.cache = transformer.forward_with_image_cache(latents, context, zero, compute_image=False)
            self.cache_rows, self.full_passes = rows, self.full_passes + 1
            return out
        return transformer.forward_text(context, zero, cached)

    def _cached_rows(self, rows: torch.Tensor):
        """The cache for these batch rows, or None when some row is not cached (then a full pass runs)."""
        if self.cache is None:
            return None
        if torch.equal(rows, self.cache_rows):
            return self.cache
        match = rows[:, None] == self.cache_rows[None, :]
        if not match.any(dim=1).all():
            return None
        return self.cache.select(match.float().argmax(dim=1).to(self.cache.keys[0].device))


def subs_log_probs(logits: torch.Tensor, ids: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Mask-id logit to -1e6, log_softmax, then revealed positions carry their own token."""
    logits = logits.clone()
    logits[:, :, mask_id] += NEG_INF
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    revealed = ids != mask_id
    logp[revealed] = NEG_INF
    logp[revealed, ids[revealed]] = 0
    return logp


def ddpm_cache_update(x: torch.Tensor, t: float, dt: float, p_x0: torch.Tensor, mask_id: int, uniform: torch.Tensor):
    """One MDLM ddpm_cache step from time t to t - dt, with the uniform noise given explicitly.

    q(x_s) = p(x0) * (t - s) for tokens and s for the mask; draw with Gumbel noise
    argmax(q / (-log(u + 1e-10) + 1e-10)); revealed tokens are kept.
    """
    t = torch.full((x.shape[0],), t, dtype=torch.float32, device=p_x0.device)
    move_t = t[:, None, None]
    move_s = (t - dt)[:, None, None]
    q = p_x0 * (move_t - move_s)
    q[:, :, mask_id] = move_s[:, :, 0]
    gumbel = 1e-10 - (uniform.to(q.device) + 1e-10).log()
    drawn = (q / gumbel).argmax(dim=-1).to(x.device)
    keep = (x != mask_id).to(x.dtype)
    return keep * x + (1 - keep) * drawn


def sample_ddpm_cache(
    denoiser: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    mask_id: int,
    steps: int,
    generator: torch.Generator,
    callback: Optional[Callable] = None,
    cancel: Optional[Callable[[], bool]] = None,
) -> torch.Tensor:
    """The published sampler: `t = linspace(1, 1e-5, steps+1)`, p(x0) reused while no token changes,
    then one final argmax pass."""
    grid = torch.linspace(1, EPS, steps + 1)
    dt = (1 - EPS) / steps
    p_x0 = None
    for i in range(steps):
        check_cancel(cancel)
        if p_x0 is None:
            p_x0 = denoiser(x).exp()
        uniform = torch.rand(p_x0.shape, generator=generator)
        x_next = ddpm_cache_update(x, grid[i].item(), dt, p_x0, mask_id, uniform)
        if not torch.equal(x_next, x):
            p_x0 = None
        x = x_next
        if callback is not None:
            callback(i + 1, steps + 1, x)
    check_cancel(cancel)
    x = denoiser(x).argmax(dim=-1).to(x.device)
    if callback is not None:
        callback(steps + 1, steps + 1, x)
    return x


def sample_confidence(
    denoiser: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    mask_id: int,
    eos_id: int,
    steps: int,
    generator: Optional[torch.Generator] = None,
    temperature: float = 0.0,
    callback: Optional[Callable] = None,
    cancel: Optional[Callable[[], bool]] = None,
    threshold: Optional[float] = None,
) -> torch.Tensor:
    """Reveal the most confident masked positions each step; stop once nothing is masked.

    Each step commits k = ceil(masked / steps left) positions per row (the top-k schedule, which
    always finishes within `steps`). With a `threshold` (a probability in (0, 1]) it commits
    max(k, every masked position whose token is at least that probable), so easy text finishes in a
    few passes; None keeps the plain schedule.
    A revealed token is never changed again. When a row commits an end-of-text token, every
    masked position after it becomes end-of-text immediately (padding, as in training).
    With `temperature > 0` the token at each position is drawn (Gumbel, seeded) instead of argmax.
    """
    if threshold is not None and not 0 < threshold <= 1:
        raise InputError(
            "threshold", f"is a probability in (0, 1], or None for the top-k schedule; got {threshold}", sep=" "
        )
    log_threshold = None if threshold is None else math.log(threshold)
    x = x.clone()
    for step in range(steps):
        active = (x == mask_id).any(dim=1).nonzero()[:, 0]  # finished rows cost nothing more
        if len(active) == 0:
            break
        check_cancel(cancel)
        rows = x[active]
        masked = rows == mask_id
        logp = denoiser(rows, active).to(x.device)
        if temperature > 0:
            u = torch.rand(logp.shape, generator=generator).to(logp.device)
            tokens = (logp / temperature - torch.log(-torch.log(u + 1e-10) + 1e-10)).argmax(dim=-1)
        else:
            tokens = logp.argmax(dim=-1)
        confidence = logp.gather(-1, tokens[..., None])[..., 0].masked_fill(~masked, -math.inf)
        for i in range(len(active)):
            k = math.ceil(int(masked[i].sum()) / (steps - step))
            if log_threshold is not None:
                k = max(k, int((confidence[i] >= log_threshold).sum()))
            chosen = confidence[i].topk(k).indices
            rows[i, chosen] = tokens[i, chosen]
            fill_after_eos(rows[i], mask_id, eos_id)
        x[active] = rows
        if callback is not None:
            callback(step + 1, steps, x)
    return x


def fill_after_eos(row: torch.Tensor, mask_id: int, eos_id: int) -> None:
    """In place: masked positions after the first committed end-of-text become end-of-text."""
    eos = (row == eos_id).nonzero()
    if len(eos):
        tail = row[eos[0, 0] + 1 :]
        tail[tail == mask_id] = eos_id
