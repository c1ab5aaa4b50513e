"""Two processes through `accelerate launch` with the shipped DDP config on this CPU-only machine (gloo) train like
one process with the same global batch: same data order, same losses (the contrastive loss over the gathered global
batch), same weights.

Why not `accelerate launch --num_processes 2 --cpu`: in accelerate 1.15, `--cpu` uses the simple launcher, which
starts ONE process unless an MPI hostfile is given (mpirun). The DDP config goes through torchrun, and the trainer
passes cpu=True to accelerate when CUDA is absent, which selects MULTI_CPU with the gloo backend."""

import subprocess
import sys

import pytest
import torch

import train_helpers as H
from train import runs


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    data = H.make_dataset(tmp_path / "data", tasks=("t2i", "edit", "caption"), per_task=8)
    common = dict(
        train={"mode": "full", "max_steps": 3, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0},
        loss={"cross": 0.5},
        checkpoint={"every": 3, "keep": 1},
    )

    one = H.base_config(tmp_path / "one", data, **common)
    (tmp_path / "one").mkdir()
    H.train_in_process(one, tmp_path / "one")

    two = H.base_config(tmp_path / "two", data, **common)
    two["train"] = dict(two["train"], batch_size=2)  # 2 processes x 2 = the same global batch of 4
    (tmp_path / "two").mkdir()
    path = H.write_config(tmp_path / "two" / "config.yaml", two)
    # `accelerate launch` of the running interpreter (its script need not be on PATH)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(H.REPO / "train/configs/accelerate/ddp.yaml"),
            "--num_processes",
            "2",
            "--main_process_port",
            "29517",
            "-m",
            "train",
            path,
        ],
        cwd=H.REPO,
        env=H.env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 process(es), DistributedType.MULTI_CPU" in proc.stderr

    a, b = H.read_metrics(one["run_dir"]), H.read_metrics(two["run_dir"])
    assert [m["step"] for m in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert x["micro"] == y["micro"]  # the same global batches
        for key in ("loss", "image", "text", "cross"):
            assert abs(x[key] - y[key]) <= 1e-4 * max(1.0, abs(x[key])), (x["step"], key, x[key], y[key])
    assert any(m["cross"] > 0 for m in a)
    wa = runs.read_trainable(runs.checkpoint_dir(one["run_dir"], 3))[0]
    wb = runs.read_trainable(runs.checkpoint_dir(two["run_dir"], 3))[0]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6), k
