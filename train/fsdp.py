"""FSDP2. `accelerate launch` with distributed_type FSDP exports the config's fsdp_* keys as FSDP_* variables. The
trainer applies torch's FSDP2 `fully_shard` itself (one unit per transformer block, then the transformer) and
hides ACCELERATE_USE_FSDP from accelerate, which then runs as plain multi-process (MULTI_GPU / MULTI_CPU):
accelerate 1.15 selects FSDP only on accelerator devices (never with gloo on CPU), so this is the one code path
that runs both on GPUs and in the CPU tests."""

import os

import torch

from .config import ConfigError


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def fsdp_settings():
    """The launch's FSDP settings ({block, reshard, offload}) or None; FSDP1 is refused."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError(
            f"accelerate config: fsdp_version {version} is not supported; the trainer runs FSDP2 "
            f"(set fsdp_version: 2, as train/configs/accelerate/fsdp.yaml does)"
        )
    strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD")
    if strategy not in ("FULL_SHARD", "1"):
        raise ConfigError(
            f"accelerate config: fsdp_sharding_strategy {strategy}: only FULL_SHARD is supported "
            f"(use the DDP config to replicate)"
        )
    flag = lambda name, default: os.environ.get(name, default).lower() == "true"  # noqa: E731
    return {
        "block": os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP") or "JointTransformerBlock",
        "reshard": flag("FSDP_RESHARD_AFTER_FORWARD", "true"),
        "offload": flag("FSDP_OFFLOAD_PARAMS", "false"),
    }


def shard_transformer(transformer, settings: dict) -> int:
    """fully_shard each block (one FSDP unit per block) and then the transformer (the rest). Returns #blocks."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard, register_fsdp_forward_method

    names = {n.strip() for n in settings["block"].split(",") if n.strip()}
    kwargs = {"reshard_after_forward": settings["reshard"]}
    if settings["offload"]:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    units = [m for m in transformer.modules() if type(m).__name__ in names]
    if not units:
        raise ConfigError(
            f"accelerate config: fsdp_transformer_layer_cls_to_wrap {settings['block']}: no such module "
            f"in the transformer (its blocks are JointTransformerBlock)"
        )
    for m in units:
        fully_shard(m, **kwargs)
    fully_shard(transformer, **kwargs)
    # called by TrainModule.forward outside transformer.forward: unshard the transformer's own parameters for it
    register_fsdp_forward_method(transformer, "project_for_alignment")
    return len(units)


def autocast_forward(forward, device_type: str, dtype):
    """`forward` under torch.autocast: mixed precision for the FSDP module, which accelerate does not prepare."""

    def wrapped(*args, **kwargs):
        with torch.autocast(device_type=device_type, dtype=dtype):
            return forward(*args, **kwargs)

    return wrapped
