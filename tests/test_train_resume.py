"""A run killed with SIGKILL in the middle of training resumes with `--resume latest` and continues the loss curve
of an uninterrupted run exactly: same step count, same data order, same losses, same final weights."""

import os
import signal
import subprocess
import time

import pytest
import torch

import train_helpers as H
from train import runs


@pytest.mark.slow
def test_resume_after_sigkill_continues_the_same_curve(tmp_path):
    data = H.make_dataset(tmp_path / "data", tasks=("t2i", "edit", "caption"), per_task=4)
    teacher = H.make_teacher(tmp_path / "clip")
    common = dict(
        train={
            "mode": "lora",
            "max_steps": 7,
            "batch_size": 2,
            "lr": 1e-3,
            "warmup_steps": 3,
            "schedule": "constant",
            "ema": True,
            "ema_decay": 0.9,
        },
        teacher={"path": teacher, "block": 2},
        loss={"align": 0.1},
        checkpoint={"every": 2, "keep": 10},
    )

    # the reference: uninterrupted
    ref_cfg = H.base_config(tmp_path / "ref", data, **common)
    (tmp_path / "ref").mkdir()
    H.train_in_process(ref_cfg, tmp_path / "ref")
    reference = H.read_metrics(ref_cfg["run_dir"])

    # the victim: a long run killed with SIGKILL as soon as its first checkpoint exists
    cfg = H.base_config(tmp_path / "victim", data, **common)
    (tmp_path / "victim").mkdir()
    path = H.write_config(tmp_path / "victim" / "config.yaml", cfg)
    proc = subprocess.Popen(
        [H.PY, "-m", "train", path, "--set", "train.max_steps=1000"],
        cwd=H.REPO,
        env=H.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    try:
        while not runs.list_checkpoints(cfg["run_dir"]):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    resumed_from = runs.list_checkpoints(cfg["run_dir"])[-1][0]
    print("killed after step", len(H.read_metrics(cfg["run_dir"])), "resuming from", resumed_from)
    assert resumed_from < 7

    # resume to the reference's length
    H.train_in_process(
        dict(cfg, train=dict(cfg["train"], max_steps=7)), tmp_path / "victim", name="resume.yaml", resume="latest"
    )
    curve = H.read_metrics(cfg["run_dir"])
    assert [m["step"] for m in curve] == list(range(1, 8))
    for got, want in zip(curve, reference):
        assert got["micro"] == want["micro"], got["step"]  # data order
        for key in ("loss", "image", "text", "cross", "align", "lr"):
            assert abs(got[key] - want[key]) <= 1e-6 * max(1.0, abs(want[key])), (got["step"], key)
    for name in (runs.TRAINABLE, runs.EMA):
        a = runs.read_trainable(runs.checkpoint_dir(cfg["run_dir"], 7), ema=name == runs.EMA)[0]
        b = runs.read_trainable(runs.checkpoint_dir(ref_cfg["run_dir"], 7), ema=name == runs.EMA)[0]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=0, atol=1e-7), (name, k)
