"""FSDP2 on this CPU-only machine: two processes (gloo) through `accelerate launch` with the shipped FSDP config
(train/configs/accelerate/fsdp.yaml: fully_shard per JointTransformerBlock, then the transformer).

- full fine-tuning with all four losses, EMA and validation images gives the losses, weights and EMA of one process
  with the same global batch, and exports a single file equal to the DDP run's export;
- LoRA: a SIGKILL of one process mid-run, then `--resume latest`, ends on the weights of an uninterrupted FSDP run;
  its LoRA export equals the DDP run's;
- two "machines" on localhost (two launches, --num_machines 2, machine_rank 0/1) train like one process.

Tolerance (FSDP/DDP vs one process): rtol 1e-4 on losses and weights, as in the DDP test. The gradients are the
same sums taken in a different order (gloo's reduce-scatter / all-reduce of per-process means instead of one
mean over the batch) and the contrastive loss sums gathered features in another order, so fp32 results differ in
the last bits, and Adam (which divides by sqrt(v)) can grow that to ~1e-6 relative in a few steps. A resumed FSDP
run against an uninterrupted FSDP run uses the same world size and order: it must agree to 1e-7.

The multi-process tests are marked slow (each launch costs ~20 s of two CPU cores): `pytest -m "not slow"` skips
them. DeepSpeed cannot run on this machine (see the README); a DeepSpeed launch on CPUs is refused, not run as DDP."""

import os
import signal
import subprocess
import time

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import train_helpers as H
from tiny_models import GOLDEN
from train import runs
from train.__main__ import main as cli
from unialign_core import load_lora, load_model

RTOL = 1e-4


def close_losses(a, b, keys=("loss", "image", "text", "cross", "align"), rtol=RTOL):
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        assert x["micro"] == y["micro"], x["step"]  # the same global batches
        for key in keys:
            assert abs(x[key] - y[key]) <= rtol * max(1.0, abs(x[key])), (x["step"], key, x[key], y[key])


# Weights after a few AdamW steps at lr 1e-3 move by about 1e-3; the processes' different summation orders change
# them by up to 4.6e-6 on an AVX2 AMD EPYC (1e-6 held on an AMX Xeon), far below what a wrong gradient would do.
def close_tensors(a, b, rtol=RTOL, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=rtol, atol=atol), (k, (a[k] - b[k]).abs().max())


def setup(tmp_path, per_task=8):
    data = H.make_dataset(tmp_path / "data", tasks=("t2i", "edit", "caption"), per_task=per_task)
    return data, H.make_teacher(tmp_path / "clip")


@pytest.mark.slow
def test_fsdp_full_matches_one_process_and_ddp_export(tmp_path):
    data, teacher = setup(tmp_path)
    common = dict(
        train={
            "mode": "full",
            "max_steps": 3,
            "batch_size": 4,
            "lr": 1e-3,
            "warmup_steps": 0,
            "ema": True,
            "ema_decay": 0.9,
        },
        teacher={"path": teacher, "block": 2},
        loss={"cross": 0.5, "align": 0.1},
        checkpoint={"every": 3, "keep": 1},
        validation={
            "every": 3,
            "prompts": ["a red square"],
            "width": 32,
            "height": 32,
            "steps": 2,
            "images": [str(tmp_path / "data" / "b0.png")],
            "caption_length": 6,
        },
    )

    one = H.base_config(tmp_path / "one", data, **common)
    (tmp_path / "one").mkdir()
    H.train_in_process(one, tmp_path / "one")

    cfgs, logs = {}, {}
    for name, accelerate_config, port in (("fsdp", "fsdp.yaml", 29531), ("ddp", "ddp.yaml", 29532)):
        cfg = H.base_config(tmp_path / name, data, **common)
        cfg["train"] = dict(cfg["train"], batch_size=2)  # 2 processes x 2 = the same global batch of 4
        (tmp_path / name).mkdir()
        proc = H.launch(accelerate_config, H.write_config(tmp_path / name / "config.yaml", cfg), port=port)
        assert "2 process(es), DistributedType.MULTI_CPU" in proc.stderr
        cfgs[name], logs[name] = cfg, proc.stderr
    assert "FSDP2: 3 JointTransformerBlock units" in logs["fsdp"] and "FSDP2" not in logs["ddp"]
    fsdp = cfgs["fsdp"]["run_dir"]

    # losses (all four terms) and weights as one process
    a, b = H.read_metrics(one["run_dir"]), H.read_metrics(fsdp)
    close_losses(a, b)
    assert all(any(m[k] > 0 for m in a) for k in ("image", "text", "cross", "align"))  # all four losses ran
    ckpt = runs.checkpoint_dir(fsdp, 3)
    runs.refuse_pickles(ckpt)  # no pickles, no .distcp shards: full tensors in safetensors
    assert os.path.isfile(os.path.join(ckpt, runs.OPTIMIZER))
    for ema in (False, True):
        close_tensors(
            runs.read_trainable(runs.checkpoint_dir(one["run_dir"], 3), ema)[0], runs.read_trainable(ckpt, ema)[0]
        )
    wa = runs.read_trainable(runs.checkpoint_dir(one["run_dir"], 3))[0]
    assert any(not torch.equal(wa[k], runs.read_trainable(ckpt, True)[0][k]) for k in wa)  # EMA is not the weights

    # validation images under FSDP (rank 0, unsharded copy with the gathered weights) match one process's
    folder = os.path.join("validation", "step_00000003")
    img = [np.asarray(Image.open(os.path.join(r, folder, "t2i_00.png")), np.float32) for r in (one["run_dir"], fsdp)]
    assert np.abs(img[0] - img[1]).max() <= 2  # uint8 rounding of nearly equal floats
    with open(os.path.join(fsdp, folder, "captions.txt")) as f:
        assert f.read().startswith("b0.png\t")

    # the single-file export of the FSDP run equals the DDP run's (both from full gathered tensors)
    outs = {}
    for name, cfg in cfgs.items():
        outs[name] = str(tmp_path / f"{name}.safetensors")
        assert cli(["export", cfg["run_dir"], "--out", outs[name]]) == 0
    with safe_open(outs["fsdp"], "pt") as f, safe_open(outs["ddp"], "pt") as g:
        assert set(f.keys()) == set(g.keys()) and not any(k.startswith("siglip_adapter") for k in f.keys())
    models = [
        load_model(outs[n], text_encoder=str(GOLDEN / "text_encoder"), vae=str(GOLDEN / "vae")).transformer
        for n in ("fsdp", "ddp")
    ]
    close_tensors(models[0].state_dict(), models[1].state_dict())


def _kill_one_worker(launcher: subprocess.Popen, run_dir: str, timeout=600):
    """SIGKILL the rank-1 worker of a running `accelerate launch` once its first checkpoint exists."""
    deadline = time.time() + timeout
    while not runs.list_checkpoints(run_dir):
        assert launcher.poll() is None, launcher.stderr.read()[-3000:]
        assert time.time() < deadline, f"no checkpoint within {timeout} s"
        time.sleep(0.02)
    workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
    assert len(workers) == 1, workers
    workers[0].send_signal(signal.SIGKILL)
    launcher.wait(120)  # torchrun stops the other worker and fails
    assert launcher.returncode != 0


@pytest.mark.slow
def test_fsdp_lora_sigkill_resume_and_lora_export(tmp_path):
    data, teacher = setup(tmp_path, per_task=4)
    common = dict(
        train={
            "mode": "lora",
            "max_steps": 5,
            "batch_size": 2,
            "lr": 1e-3,
            "warmup_steps": 2,
            "schedule": "constant",
            "ema": True,
            "ema_decay": 0.9,
        },
        teacher={"path": teacher, "block": 2},
        loss={"cross": 0.5, "align": 0.1},
        checkpoint={"every": 2, "keep": 10},
    )
    cfgs = {}
    for name in ("ref", "victim", "ddp"):
        cfgs[name] = H.base_config(tmp_path / name, data, **common)
        (tmp_path / name).mkdir()
        cfgs[name]["path"] = H.write_config(tmp_path / name / "config.yaml", dict(cfgs[name]))
    H.launch("fsdp.yaml", cfgs["ref"]["path"], port=29533)
    H.launch("ddp.yaml", cfgs["ddp"]["path"], port=29534)

    victim = cfgs["victim"]["run_dir"]
    launcher = subprocess.Popen(
        H.launch_args("fsdp.yaml", cfgs["victim"]["path"], "--set", "train.max_steps=1000", port=29535),
        cwd=H.REPO,
        env=H.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _kill_one_worker(launcher, victim)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(30)
    resumed_from = runs.list_checkpoints(victim)[-1][0]
    assert resumed_from < 5
    runs.refuse_pickles(runs.checkpoint_dir(victim, resumed_from))
    proc = H.launch("fsdp.yaml", cfgs["victim"]["path"], "--resume", "latest", port=29536)
    assert f"resumed from {runs.checkpoint_dir(victim, resumed_from)}" in proc.stderr

    ref = cfgs["ref"]["run_dir"]
    close_losses(
        H.read_metrics(ref), H.read_metrics(victim), keys=("loss", "image", "text", "cross", "align", "lr"), rtol=1e-6
    )
    for ema in (False, True):
        close_tensors(
            runs.read_trainable(runs.checkpoint_dir(ref, 5), ema)[0],
            runs.read_trainable(runs.checkpoint_dir(victim, 5), ema)[0],
            rtol=0,
            atol=1e-7,
        )
    # FSDP trains like DDP with LoRA too
    close_losses(H.read_metrics(cfgs["ddp"]["run_dir"]), H.read_metrics(ref))

    # the LoRA export of the FSDP run loads and equals the DDP run's
    files = {}
    for name in ("ref", "ddp"):
        files[name] = str(tmp_path / f"{name}-lora.safetensors")
        assert cli(["export", cfgs[name]["run_dir"], "--lora", files[name]]) == 0
    a, b = load_lora(files["ref"]), load_lora(files["ddp"])
    assert a.keys() == b.keys() and len(a) == 8 * 3
    for k in a:
        assert a[k].alpha == b[k].alpha == 8
        assert torch.allclose(a[k].down, b[k].down, rtol=RTOL, atol=1e-6), k
        assert torch.allclose(a[k].up, b[k].up, rtol=RTOL, atol=1e-6), k
    assert any(a[k].up.abs().max() > 0 for k in a)  # trained (B starts at zero)


@pytest.mark.slow
def test_two_machines_on_localhost_train_like_one_process(tmp_path):
    """Two `accelerate launch` calls with --num_machines 2 and machine_rank 0 / 1 (one process each) rendezvous
    on 127.0.0.1, as two hosts would on --main_process_ip: rank 0 writes the run folder, both read it."""
    data, _ = setup(tmp_path)
    common = dict(
        train={"mode": "full", "max_steps": 3, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0},
        loss={"cross": 0.5},
        checkpoint={"every": 3, "keep": 1},
    )
    one = H.base_config(tmp_path / "one", data, **common)
    (tmp_path / "one").mkdir()
    H.train_in_process(one, tmp_path / "one")

    two = H.base_config(tmp_path / "two", data, **common)
    two["train"] = dict(two["train"], batch_size=2)
    (tmp_path / "two").mkdir()
    path = H.write_config(tmp_path / "two" / "config.yaml", two)
    machines = [
        subprocess.Popen(
            H.launch_args(
                "ddp.yaml",
                path,
                port=29537,
                extra=("--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1"),
            ),
            cwd=H.REPO,
            env=H.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    errors = [m.communicate(timeout=900)[1] for m in machines]
    assert [m.returncode for m in machines] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    assert "2 process(es), DistributedType.MULTI_CPU" in errors[0]
    close_losses(
        H.read_metrics(one["run_dir"]), H.read_metrics(two["run_dir"]), keys=("loss", "image", "text", "cross")
    )
    close_tensors(
        runs.read_trainable(runs.checkpoint_dir(one["run_dir"], 3))[0],
        runs.read_trainable(runs.checkpoint_dir(two["run_dir"], 3))[0],
    )


@pytest.mark.slow
def test_deepspeed_on_cpu_is_refused_not_run_as_ddp(tmp_path):
    """accelerate 1.15 would silently run a zero2/zero3 launch as DDP on CPUs (cpu=True ignores DeepSpeed)."""
    data = H.make_dataset(tmp_path / "data", tasks=("t2i",), per_task=2)
    path = H.write_config(tmp_path / "config.yaml", H.base_config(tmp_path, data))
    env = dict(H.env(), ACCELERATE_USE_DEEPSPEED="true")  # what `accelerate launch` with zero2.yaml exports
    proc = subprocess.run([H.PY, "-m", "train", path], cwd=H.REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "DeepSpeed (zero2 / zero3) runs only on GPUs" in proc.stderr, proc.stderr[-2000:]
    assert not os.path.isdir(os.path.join(tmp_path, "run", "checkpoints"))
