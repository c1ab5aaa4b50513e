"""Training throughput: timed optimizer steps of the four combined losses on a synthetic batch.

    python -m tools.bench_train [--size tiny|small|full] [--steps N] [--batch B] [--task t2i|edit|caption]
                          [--mode full|lora] [--device cpu|cuda] [--precision no|bf16] [--[no-]checkpointing]
                          [--threads N]

Sizes (built in memory from configs, random weights; nothing is downloaded or read):
  * tiny:  2 blocks x 32 wide, 128 px images (16x16 latents), 32 text tokens -- CPU;
  * small: 8 blocks x 256 wide, 256 px images (32x32 latents), 64 text tokens -- CPU;
  * full:  SD3-medium, 24 blocks x 1536 wide (2.1 B parameters with the projectors), 512 px images (64x64
    latents), 256 text tokens, Qwen2.5-VL-sized projectors (3584) at block 8, bf16 autocast and gradient
    checkpointing -- a GPU.

Each step is what one micro-step of `train/loop.py` does with `train.grad_accum=1`: `losses.compute_losses`
(the image pass, the text pass and the alignment projections through `losses.TrainModule`, all four loss
terms at the published weights), backward, gradient clipping at 2.0, AdamW (`optim.make_optimizer_and_schedule`)
and the scheduler step. What it leaves out: the frozen encoders. The batch holds ready-made latents, T5 states
and teacher features (what the trainer's caches give back), and T5's re-encoding of the masked caption ids in
the text pass, which the trainer runs on every micro-step, is a frozen embedding lookup here. So the figures are
the transformer's training throughput, an upper bound for the whole loop.

Peak memory: `torch.cuda.max_memory_allocated` on a GPU; on the CPU the process's peak resident set size
(`resource.getrusage`), which includes the Python interpreter and the libraries (the table also shows the RSS
before the model was built). The frozen T5-XXL (~9.5 GB in bf16) and teacher (~16.6 GB for Qwen2.5-VL-7B) that
the real loop keeps on the GPU are not in these figures.
"""

import argparse
import dataclasses
import resource
import sys
import time

import torch

from tools.random_models import random_transformer
from train.config import Config, LossConfig
from train.lora import apply_lora
from train.losses import Prepared, Reducer, SampleRNG, TrainModule
from train.optim import make_optimizer_and_schedule
from train.step import TrainStep

VOCAB = 32100  # the T5 tokenizer's size: the text head's width
MASK_ID = 32099  # <extra_id_0>, the mask token
EOS_ID = 1
LATENT_CHANNELS = 16


@dataclasses.dataclass
class Size:
    layers: int
    heads: int
    head_dim: int
    joint_dim: int  # width of the text encoder states (4096 for T5-XXL)
    latent: int  # latent side (image side / 8)
    text_length: int
    batch: int
    align_dim: int  # teacher embedding size
    block: int  # aligned block (1-based)
    pos_embed_max_size: int
    device: str
    precision: str
    checkpointing: bool


SIZES = {
    "tiny": Size(layers=2, heads=2, head_dim=16, joint_dim=32, latent=16, text_length=32, batch=4, align_dim=32,
                 block=1, pos_embed_max_size=32, device="cpu", precision="no", checkpointing=False),
    "small": Size(layers=8, heads=4, head_dim=64, joint_dim=256, latent=32, text_length=64, batch=4, align_dim=256,
                  block=4, pos_embed_max_size=64, device="cpu", precision="no", checkpointing=False),
    "full": Size(layers=24, heads=24, head_dim=64, joint_dim=4096, latent=64, text_length=256, batch=4, align_dim=3584,
                 block=8, pos_embed_max_size=192, device="cuda", precision="bf16", checkpointing=True),
}  # fmt: skip


def build_transformer(size: Size):
    return random_transformer(
        layers=size.layers,
        heads=size.heads,
        head_dim=size.head_dim,
        joint_dim=size.joint_dim,
        vocab=VOCAB,
        pos_embed_max_size=size.pos_embed_max_size,
        sample_size=size.latent,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        pooled_projection_dim=size.heads * size.head_dim,
        align_dim=size.align_dim,
    )


def synthetic_batch(size: Size, task: str, device, generator: torch.Generator):
    """A `losses.Prepared` micro-batch of random latents, T5 states, caption ids and teacher features."""
    b, n, lat = size.batch, size.text_length, size.latent

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    image = randn(b, LATENT_CHANNELS, lat, lat)
    source = randn(b, LATENT_CHANNELS, lat, lat)
    # captions of 3/4 of the length, then EOS padding (as the trainer pads them)
    real = max(1, 3 * n // 4)
    ids = torch.full((b, n), EOS_ID, dtype=torch.long)
    ids[:, :real] = torch.randint(2, MASK_ID, (b, real), generator=generator)
    not_pad = torch.zeros(b, n, dtype=torch.bool)
    not_pad[:, : real + 1] = True
    generate = task in ("t2i", "edit")
    return Prepared(
        target=image if generate else None,
        conditions=[source] if task == "edit" else [],
        prompt_context=randn(b, n, size.joint_dim) if generate else None,
        null_context=randn(1, n, size.joint_dim),
        understand=image if generate else source,
        ids=ids.to(device),
        maskable=torch.ones(b, n, dtype=torch.bool, device=device),
        not_pad=not_pad.to(device),
        caption_valid=torch.ones(b, dtype=torch.bool, device=device),
        sample_valid=torch.ones(b, dtype=torch.bool, device=device),
        teacher_image=randn(b, size.align_dim),
        teacher_text=randn(b, size.align_dim),
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def peak_rss_bytes() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024  # Linux reports KiB, macOS bytes


def run(
    size_name="tiny",
    steps=10,
    warmup=2,
    batch=None,
    task="t2i",
    mode="full",
    device=None,
    precision=None,
    checkpointing=None,
    threads=None,
    seed=0,
) -> dict:
    """Build, warm up, time `steps` optimizer steps; returns the figures (also what `main` prints)."""
    size = SIZES[size_name]
    if batch is not None:
        size = dataclasses.replace(size, batch=batch)
    device = torch.device(device or size.device)
    precision = precision or size.precision
    checkpointing = size.checkpointing if checkpointing is None else checkpointing
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--size {size_name} runs on a GPU and there is none here; pass --device cpu to try anyway")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rss_before = peak_rss_bytes()  # the interpreter and the libraries, before the model exists

    cfg = Config()
    cfg.train.mode, cfg.train.lr, cfg.train.warmup_steps = mode, 3e-5, 0
    cfg.train.max_steps = warmup + steps
    loss_cfg = LossConfig()  # the published weights 1 / 0.2 / 0.05 / 0.1, temperature 0.07, text dropout 0.1

    transformer = build_transformer(size).to(device).train()
    if mode == "lora":
        apply_lora(transformer, cfg)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    module = TrainModule(transformer)
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer_and_schedule(trainable, cfg)

    # stand-in for T5 re-encoding the masked caption ids: a frozen lookup to T5-shaped states
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    table = torch.randn(VOCAB, size.joint_dim, generator=torch.Generator().manual_seed(seed)).to(device, dtype)

    def encode_ids(ids):
        return table[ids.to(device)].float()

    gen = torch.Generator().manual_seed(seed)
    prepared = synthetic_batch(size, task, device, gen)
    positions = list(range(size.batch))
    train_step = TrainStep(
        module,
        optimizer,
        loss_cfg,
        encode_ids,
        MASK_ID,
        clip=lambda: torch.nn.utils.clip_grad_norm_(trainable, cfg.train.grad_clip),
        reducer=Reducer(),
        block=size.block,
        forward_context=lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"),
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    losses, started = [], None
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        logged, _ = train_step(prepared, SampleRNG(seed, step, positions, size.batch))
        scheduler.step()
        losses.append({k: float(v) for k, v in logged.items()})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()

    dim = size.heads * size.head_dim
    return {
        "size": size_name,
        "blocks x width": f"{size.layers} x {dim}",
        "image / latent": f"{size.latent * 8} px / {size.latent}x{size.latent}",
        "text tokens": size.text_length,
        "task": task,
        "mode": mode,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "precision": precision,
        "gradient checkpointing": checkpointing,
        "parameters": sum(p.numel() for p in transformer.parameters()),
        "trainable": sum(p.numel() for p in trainable),
        "batch": size.batch,
        "timed steps": steps,
        "warm-up steps": warmup,
        "s / step": elapsed / steps,
        "samples / s": size.batch * steps / elapsed,
        "peak memory": peak,
        "peak memory kind": "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS",
        **({} if device.type == "cuda" else {"RSS before the model": rss_before}),
        "loss (mean of timed steps)": sum(x["loss"] for x in losses[warmup:]) / steps,
    }


def format_table(result: dict) -> str:
    rows = []
    for key, value in result.items():
        if key == "peak memory kind":
            continue
        if key == "peak memory":
            value = f"{human_bytes(value)} ({result['peak memory kind']})"
        elif key == "RSS before the model":
            value = human_bytes(value)
        elif key in ("parameters", "trainable"):
            value = f"{value:,}"
        elif isinstance(value, float):
            value = f"{value:.4g}"
        rows.append((key, str(value)))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2) + "+" + "-" * (max(len(v) for _, v in rows) + 2)
    return "\n".join([line] + [f" {k:<{width}} | {v}" for k, v in rows] + [line])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--batch", type=int, help="samples per step (default 4)")
    parser.add_argument(
        "--task",
        choices=("t2i", "edit", "caption"),
        default="t2i",
        help="batch kind: t2i (image + text pass), edit (plus a condition image), caption (text pass only)",
    )
    parser.add_argument("--mode", choices=("full", "lora"), default="full")
    parser.add_argument("--device", help="cpu or cuda (default: cpu for tiny/small, cuda for full)")
    parser.add_argument("--precision", choices=("no", "bf16"), help="default: bf16 for full, no for the others")
    parser.add_argument(
        "--checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="gradient checkpointing (default: on for full, off for the others)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    result = run(
        args.size,
        args.steps,
        args.warmup,
        args.batch,
        args.task,
        args.mode,
        args.device,
        args.precision,
        args.checkpointing,
        args.threads,
    )
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
