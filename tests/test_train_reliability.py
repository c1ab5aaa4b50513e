"""What a config, a data file, a run folder, a signal or a full disk can no longer do to a run (issue 20, trainer).

- config values out of range or not finite are refused at load, naming the key, the value and the allowed range;
- image paths outside the data folder (../, absolute, symlinks) are skipped unless data.allow_outside, and a FIFO,
  a folder or a device is "not a regular file";
- a run folder with checkpoints is continued (--resume) or started over (--overwrite), never silently mixed;
- one trainer per run folder (train.lock), a stale lock is taken over;
- the first non-finite loss or gradient stops the run without writing a checkpoint;
- SIGINT / SIGTERM finish the step, write a checkpoint and print the --resume command; a second one stops at once;
- a killed export's temporary is removed by the next export; a full disk is one line, the previous file intact;
- --set train.lr on --resume is applied (and said); a pickle in place of a checkpoint file is named.

Most cases call `python -m train`'s own function (`train.__main__.main`) in this process: on a busy machine a fresh
interpreter spends minutes importing torch. Signals go to real `python -m train` processes; the killed export is a
forked copy of this process, SIGKILLed while it writes.
"""

import errno
import fcntl
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import threading
import time

import pytest
from safetensors.torch import load_file

import train_helpers as H
from train import runs

LOCK = "train.lock"  # <run_dir>/train.lock: flock-ed by the trainer that uses the folder, holds its PID and host


def cli(capsys, *args):
    """`python -m train ARGS` run in this process: (exit code, stderr)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from train.__main__ import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
    return code, capsys.readouterr().err


def last_line(err):
    return err.strip().splitlines()[-1]


def temporaries(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished 2-step LoRA run (one checkpoint), started with a stale lock of a killed trainer in its folder."""
    tmp = tmp_path_factory.mktemp("reliability")
    data = H.make_dataset(tmp / "data", tasks=("t2i",), per_task=4)
    cfg = H.base_config(tmp, data, train={"max_steps": 2, "batch_size": 2}, checkpoint={"every": 2, "keep": 2})
    path = H.write_config(tmp / "config.yaml", cfg)
    os.makedirs(cfg["run_dir"])
    with open(os.path.join(cfg["run_dir"], LOCK), "w") as f:
        f.write("pid 999999999 on a-machine, since 2020-01-01 00:00:00\n")  # a trainer that was killed
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from train.__main__ import main

    try:
        code = main([path])
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
    return tmp, cfg, path, code


def copy_run(done, tmp_path):
    """A copy of the finished run (tests that change a run work on a copy); returns its run_dir."""
    _, cfg, _, _ = done
    run_dir = str(tmp_path / "run")
    shutil.copytree(cfg["run_dir"], run_dir)
    return run_dir


def test_a_stale_lock_is_taken_over_and_released(done):
    _, cfg, _, code = done
    assert code == 0
    assert [s for s, _ in runs.list_checkpoints(cfg["run_dir"])] == [2]
    assert not os.path.exists(os.path.join(cfg["run_dir"], LOCK))  # released at the end


def test_config_values_out_of_range_are_refused_at_load(done, capsys):
    _, _, path, _ = done
    cases = {
        # non-finite training (the item 7): each ran to "done" with NaN weights
        "train.lr=.inf": "train.lr: must be a finite number > 0, got inf",
        "train.grad_clip=.nan": "train.grad_clip: must be a finite number > 0 (a large value such as 1e9 leaves the "
        "gradients unclipped), got nan",
        "loss.text=.nan": "loss.text: must be a finite number >= 0, got nan",
        "loss.temperature=.nan": "loss.temperature: must be a finite number > 0, got nan",
        "train.weight_decay=.inf": "train.weight_decay: must be a finite number >= 0, got inf",
        "train.lora.alpha=.nan": "train.lora.alpha: must be a finite number > 0, got nan",
        "loss.logit_mean=.nan": "loss.logit_mean: must be a finite number, got nan",
        # out of range (item 14): a ZeroDivisionError, a traceback, nonsense, or 21.5 GB and the OOM killer
        "data.resolution=8": "data.resolution: must be a finite number in [16, 4096] (pixels per side of the square "
        "bucket; at least data.bucket_step), got 8",
        "data.bucket_step=0": "data.bucket_step: must be a finite number in [16, 4096] and a multiple of 16",
        "train.betas=[2, 3]": "train.betas[0]: must be a finite number in [0, 1) (Adam's decay rates), got 2.0",
        "seed=-1": "seed: must be a finite number in [0, 4294967295] (NumPy's seeds), got -1",
        "train.lr=.nan": "train.lr: must be a finite number > 0, got nan",
        "data.max_aspect=0": "data.max_aspect: must be a finite number in [1, 16]",
        "train.warmup_steps=1000000000000": "train.warmup_steps: must be a finite number in [0, 1000000000], got "
        "1000000000000",
        "train.lora.rank=1000000": "train.lora.rank: must be a finite number in [1, 1536] (SD3-medium's width is "
        "1536: a higher rank is no longer low-rank), got 1000000",
        "data.resolution=32 --set data.bucket_step=48": "data.resolution: must be >= data.bucket_step (48), got 32",
    }
    for override, message in cases.items():
        args = [a for item in override.split(" --set ") for a in ("--set", item)]
        code, err = cli(capsys, path, *args)
        assert code == 2 and "Traceback" not in err, (override, err)
        assert last_line(err).startswith(f"config error: {message}"), (override, last_line(err))


def test_image_paths_stay_in_the_data_folder(tmp_path, capsys, caplog):
    data = tmp_path / "data"
    path = H.make_dataset(data, tasks=("t2i",), per_task=4)
    outside = H.png(tmp_path / "outside.png", (10, 200, 10))
    secret = tmp_path / "secret.txt"  # stands for /etc/shadow
    secret.write_text("root:$6$not-for-training\n")
    os.symlink(outside, data / "link_to_outside.png")
    os.symlink(secret, data / "shadow.png")
    os.mkfifo(data / "fifo.png")
    (data / "folder.png").mkdir()
    targets = ["../outside.png", outside, "link_to_outside.png", "shadow.png", "fifo.png", "folder.png", "/dev/zero"]
    with open(path, "a") as f:
        for target in targets:
            f.write(json.dumps({"task": "t2i", "prompt": f"from {target}", "target": target}) + "\n")
    cfg = H.base_config(tmp_path, path, train={"max_steps": 1, "batch_size": 2}, checkpoint={"every": 1, "keep": 1})
    config = H.write_config(tmp_path / "config.yaml", cfg)

    with caplog.at_level(logging.INFO):
        code, err = cli(capsys, config)
    assert code == 0, err
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: 4 records from 1 files")]
    assert summary and summary[0].endswith("skipped 7 {'not_a_regular_file': 2, 'outside_data_folder': 5}"), summary
    shown = "\n".join(r.getMessage() for r in caplog.records)
    assert f"shadow.png -> {secret} is outside the data folder {data}; set data.allow_outside: true" in shown
    assert "fifo.png is a FIFO, not a regular file" in shown and "folder.png is a folder, not a regular file" in shown

    # allowed explicitly: the outside images train; the FIFO, the folder and /dev/zero are still not files
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code, err = cli(capsys, config, "--set", "data.allow_outside=true", "--set", f"run_dir={tmp_path / 'run2'}")
    assert code == 0, err
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: 8 records from 1 files")]
    assert summary and summary[0].endswith("skipped 3 {'not_a_regular_file': 3}"), summary
    assert "/dev/zero is a device or socket, not a regular file" in "\n".join(r.getMessage() for r in caplog.records)


def test_a_run_folder_with_checkpoints_needs_resume_or_overwrite(done, tmp_path, capsys):
    _, _, path, _ = done
    run_dir = copy_run(done, tmp_path)
    checkpoint = runs.checkpoint_dir(run_dir, 2)
    before = open(os.path.join(checkpoint, runs.TRAINABLE), "rb").read()
    code, err = cli(capsys, path, "--set", f"run_dir={run_dir}")
    assert code == 2 and "Traceback" not in err
    assert last_line(err) == (
        f"config error: run_dir {run_dir} already holds checkpoints (the latest is step 2); continue it with --resume "
        "latest, start it over with --overwrite (deletes its checkpoints, metrics and logs), or give this run "
        "another run_dir"
    )
    assert open(os.path.join(checkpoint, runs.TRAINABLE), "rb").read() == before
    assert [m["step"] for m in H.read_metrics(run_dir)] == [1, 2]

    code, err = cli(capsys, path, "--set", f"run_dir={run_dir}", "--overwrite")
    assert code == 0, err
    assert [m["step"] for m in H.read_metrics(run_dir)] == [1, 2]  # once, not steps 1-2 twice
    assert [s for s, _ in runs.list_checkpoints(run_dir)] == [2]


def test_one_trainer_per_run_folder(done, tmp_path, capsys):
    _, _, path, _ = done
    run_dir = copy_run(done, tmp_path)
    with open(os.path.join(run_dir, LOCK), "w") as holder:  # another trainer (two open files' flocks conflict)
        holder.write("pid 4242 on gpu-7, since 2025-01-01 12:00:00\n")
        holder.flush()
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, err = cli(capsys, path, "--set", f"run_dir={run_dir}", "--set", "train.max_steps=3", "--resume", "latest")
    assert code == 1 and "Traceback" not in err
    assert last_line(err) == (
        f"error: run_dir {run_dir} is in use by another trainer (pid 4242 on gpu-7, since 2025-01-01 12:00:00; lock "
        f"{run_dir}/{LOCK}); wait for it to finish, stop it, or give this run another run_dir"
    )
    assert [s for s, _ in runs.list_checkpoints(run_dir)] == [2]


def test_a_non_finite_loss_stops_the_run_without_a_checkpoint(done, tmp_path, capsys):
    _, _, path, _ = done
    run_dir = copy_run(done, tmp_path)
    good = runs.checkpoint_dir(run_dir, 2)
    before = open(os.path.join(good, runs.TRAINABLE), "rb").read()
    # a weight that overflows float32: the loss of step 3 is infinite
    args = ["--set", f"run_dir={run_dir}", "--set", "train.max_steps=4", "--set", "loss.image=1e39"]
    code, err = cli(capsys, path, *args, "--resume", "latest")
    assert code == 1 and "Traceback" not in err
    assert last_line(err).startswith("error: step 3: not finite: loss inf")
    assert f"stopped without writing this step (the last checkpoint {good} is intact)" in last_line(err)
    assert [s for s, _ in runs.list_checkpoints(run_dir)] == [2]
    assert open(os.path.join(good, runs.TRAINABLE), "rb").read() == before
    assert [m["step"] for m in H.read_metrics(run_dir)] == [1, 2]
    assert os.listdir(os.path.join(run_dir, runs.CHECKPOINTS)) == ["step_00000002"]


def test_lr_set_on_resume_is_applied_and_stale_temporaries_go(done, tmp_path, capsys, caplog):
    _, _, path, _ = done
    run_dir = copy_run(done, tmp_path)
    for name in ("init_report.json.tmp", ".metrics.jsonl.999999999.tmp"):  # left by killed trainers
        (tmp_path / "run" / name).write_text("{half")
    with caplog.at_level(logging.WARNING):
        code, err = cli(
            capsys, path, "--set", f"run_dir={run_dir}", "--set", "train.max_steps=3", "--set", "train.lr=5e-4",
            "--resume", "latest",
        )  # fmt: skip
    assert code == 0, err
    assert [m["lr"] for m in H.read_metrics(run_dir)] == [1e-3, 1e-3, 5e-4]
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--resume: ")]
    assert said == ["--resume: train.lr 0.0005 from the config (the checkpoint had 0.001), from step 2 on"]
    assert temporaries(run_dir) == []


def test_a_pickle_in_place_of_a_checkpoint_file_is_named(done, tmp_path, capsys):
    _, _, path, _ = done
    run_dir = copy_run(done, tmp_path)
    marker = tmp_path / "payload_ran"

    class Trap:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(os.path.join(runs.checkpoint_dir(run_dir, 2), runs.TRAINABLE), "wb") as f:
        pickle.dump(Trap(), f)
    code, err = cli(capsys, path, "--set", f"run_dir={run_dir}", "--set", "train.max_steps=3", "--resume", "latest")
    assert code == 1 and "Traceback" not in err
    assert "refused, it holds pickle files (trainable.safetensors)" in last_line(err)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------------------
# Export: a killed export's temporary, a full disk


def full_disk(*_, **__):
    from safetensors import SafetensorError

    # what safetensors raises when the disk fills up under it
    raise SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    )


def test_an_export_removes_what_a_killed_export_left(done, tmp_path, capsys):
    _, cfg, _, _ = done
    out = tmp_path / "lora.safetensors"
    assert cli(capsys, "export", cfg["run_dir"], "--lora", out)[0] == 0
    previous, tensors = out.read_bytes(), load_file(str(out))

    pid = os.fork()
    if pid == 0:  # a copy of this process exports and is SIGKILLed once the temporary is written in full
        try:
            import safetensors.torch

            import unialign_core.checkpoint as checkpoint

            def write_then_die(tensors, tmp, metadata=None):
                safetensors.torch.save_file(tensors, tmp, metadata=metadata)
                os.kill(os.getpid(), signal.SIGKILL)

            checkpoint.save_file = write_then_die
            from train.__main__ import main

            main(["export", cfg["run_dir"], "--lora", str(out)])
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    left = tmp_path / f".lora.safetensors.{pid}.tmp"
    assert temporaries(tmp_path) == [left.name] and left.stat().st_size == len(previous)  # full size
    assert out.read_bytes() == previous

    code, err = cli(capsys, "export", cfg["run_dir"], "--lora", out)
    assert code == 0, err
    assert temporaries(tmp_path) == []
    again = load_file(str(out))
    assert again.keys() == tensors.keys() and all(again[k].equal(v) for k, v in tensors.items())


def test_an_export_on_a_full_disk_says_so(done, tmp_path, capsys, monkeypatch):
    import unialign_core.checkpoint as checkpoint

    _, cfg, _, _ = done
    out = tmp_path / "lora.safetensors"
    assert cli(capsys, "export", cfg["run_dir"], "--lora", out)[0] == 0
    previous = out.read_bytes()
    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    code, err = cli(capsys, "export", cfg["run_dir"], "--lora", out)
    assert code == 1 and "Traceback" not in err
    assert last_line(err) == (
        f"error: no space left on {tmp_path} while writing lora.safetensors; the previous file {out} is intact. "
        "Free some space"
    )
    assert out.read_bytes() == previous and temporaries(tmp_path) == []


def test_the_trainer_start_on_a_full_disk_says_so(done, tmp_path, capsys, monkeypatch):
    """The disk fills up while the trainer writes init_report.json (simulated: the file's writes fail)."""
    import unialign_core.files as files

    _, _, path, _ = done
    real_open = open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[:10])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    def fake_open(name, mode="r", *args, **kwargs):
        f = real_open(name, mode, *args, **kwargs)
        return FullDisk(f) if "init_report.json" in str(name) and "w" in mode else f

    monkeypatch.setattr(files, "open", fake_open, raising=False)
    run_dir = tmp_path / "run"
    code, err = cli(capsys, path, "--set", f"run_dir={run_dir}")
    assert code == 1 and "Traceback" not in err
    assert last_line(err) == (
        f"error: no space left on {run_dir} while writing init_report.json; {run_dir / 'init_report.json'} was not "
        "written. Free some space; then run the command again"
    )
    assert temporaries(run_dir) == [] and sorted(os.listdir(run_dir)) == ["config.yaml"]


@pytest.fixture
def small_disk(tmp_path):
    """A real 12 KiB filesystem, three pages (tmpfs; needs the right to mount, else the test is skipped)."""
    folder = tmp_path / "small"
    folder.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(folder)], capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_real_full_disk(done, small_disk, capsys):
    _, cfg, path, _ = done
    # the trainer's start: its lock and config fit (a page each), its init report (10 KB) does not
    run_dir = small_disk / "run"
    code, err = cli(capsys, path, "--set", f"run_dir={run_dir}")
    assert code == 1 and "Traceback" not in err, err
    assert last_line(err).startswith(f"error: no space left on {run_dir} while writing ")
    assert temporaries(run_dir) == []
    shutil.rmtree(run_dir)
    # an export larger than the disk; a previous file stays as it was
    out = small_disk / "model.safetensors"
    out.write_bytes(b"previous")
    code, err = cli(capsys, "export", cfg["run_dir"], "--out", out)
    assert code == 1 and "Traceback" not in err, err
    assert last_line(err) == (
        f"error: no space left on {small_disk} while writing model.safetensors; the previous file {out} is intact. "
        "Free some space"
    )
    assert out.read_bytes() == b"previous" and temporaries(small_disk) == []


# --------------------------------------------------------------------------------------------------------------
# Signals: real `python -m train` processes


class Background:
    """`python -m train ARGS` in the background, its stderr collected line by line."""

    def __init__(self, *args):
        self.proc = subprocess.Popen(
            [H.PY, "-m", "train", *map(str, args)],
            cwd=H.REPO,
            env=H.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()

    def wait_for(self, what, timeout=1800):
        deadline = time.time() + timeout
        while not what():
            assert self.proc.poll() is None, "".join(self.lines)[-3000:]
            assert time.time() < deadline, "".join(self.lines)[-3000:]
            time.sleep(0.05)

    def said(self, text):
        return any(text in line for line in self.lines)

    def end(self, timeout=1800):
        self.proc.wait(timeout)
        time.sleep(0.5)  # the reader thread takes the last lines
        return self.proc.returncode, "".join(self.lines)


def steps_logged(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    return len(open(path).readlines()) if os.path.isfile(path) else 0


@pytest.mark.slow
def test_ctrl_c_and_sigterm(done, tmp_path):
    _, _, path, _ = done
    run_dir = str(tmp_path / "run")
    # long steps (8 micro-batches each), a checkpoint only at the end of 1000 steps
    args = ["--set", f"run_dir={run_dir}", "--set", "train.max_steps=1000", "--set", "train.grad_accum=8"]
    first = Background(path, *args, "--set", "checkpoint.every=0")
    first.wait_for(lambda: steps_logged(run_dir) >= 1)
    first.proc.send_signal(signal.SIGINT)
    code, err = first.end()
    assert code == 130 and "Traceback" not in err, err
    step = runs.list_checkpoints(run_dir)[-1][0]
    assert [s for s, _ in runs.list_checkpoints(run_dir)] == [step] and steps_logged(run_dir) == step
    command = f"python -m train {run_dir}/config.yaml --resume latest"
    assert err.strip().splitlines()[-1] == (
        f"stopped by SIGINT after step {step}: checkpoint {runs.checkpoint_dir(run_dir, step)}. Continue with: {command}"
    )
    assert "SIGINT: finishing this step, then writing a checkpoint; SIGINT again stops at once" in err

    # the printed command continues; SIGTERM asks for the same, and a second signal stops at once
    second = Background(*command.split()[3:])
    second.wait_for(lambda: steps_logged(run_dir) > step)
    second.proc.send_signal(signal.SIGTERM)
    second.wait_for(lambda: second.said("SIGTERM: finishing this step"))
    second.proc.send_signal(signal.SIGINT)
    code, err = second.end()
    assert code == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"stopped at once (a second SIGINT); the last checkpoint is {runs.checkpoint_dir(run_dir, step)}; continue "
        f"with: {command}"
    )
    assert [s for s, _ in runs.list_checkpoints(run_dir)] == [step]
