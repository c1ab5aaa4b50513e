"""One training micro-step: the losses of a prepared micro-batch, backward, clipping and the optimizer step.

    step = TrainStep(module, optimizer, cfg.loss, encode_ids, mask_id, clip=clip, reducer=reducer, block=block)
    logged, grad_norm = step(prepared, rng)

The trainer (`train/loop.py`), the throughput benchmark (`tools/bench_train.py`) and the full-size rehearsal
(`tools/rehearse_train.py`) all take their steps through it. What differs between them is passed in: how the
loss is back-propagated (accelerate's backward, with the gradient-accumulation factor, or a plain one), how the
gradients are clipped, and the context of the forward pass (autocast). The learning-rate schedule steps once per
optimizer step, after its micro-steps: that is the caller's.
"""

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .config import LossConfig
from .losses import Prepared, Reducer, SampleRNG, compute_losses


def plain_backward(total: torch.Tensor):
    total.backward()


@dataclass
class TrainStep:
    """`module` is a (wrapped) `losses.TrainModule`; `loss` the config's loss section; `encode_ids` maps token ids
    to T5 states (no gradient); `clip()` clips the gradients and returns their norm; `backward(total)`
    back-propagates; `forward_context()` wraps the forward pass and the losses (e.g. autocast)."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss: LossConfig
    encode_ids: Callable
    mask_id: int
    clip: Callable[[], torch.Tensor]
    reducer: Reducer = None
    block: Optional[int] = None
    backward: Callable[[torch.Tensor], None] = plain_backward
    forward_context: Callable = contextlib.nullcontext

    def __call__(
        self,
        batch: Prepared,
        rng: SampleRNG,
        sync: bool = True,
        after_forward: Optional[Callable[[], None]] = None,
        after_backward: Optional[Callable[[], None]] = None,
    ):
        """One micro-step on `batch` with the draws of `rng`. `sync`: this micro-batch completes the optimizer step
        (the gradients are clipped; with gradient accumulation the optimizer, wrapped by accelerate, steps only
        then). `after_forward` / `after_backward` are called between the phases (timings, progress).
        Returns ({term: detached value}, the gradient norm before clipping or None when not `sync`)."""
        with self.forward_context():
            total, logged = compute_losses(
                self.module, batch, rng, self.loss, self.encode_ids, self.mask_id, self.reducer, self.block
            )
        if after_forward is not None:
            after_forward()
        self.backward(total)
        if after_backward is not None:
            after_backward()
        grad_norm = self.clip() if sync else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return logged, grad_norm
