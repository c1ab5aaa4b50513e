"""Checkpoints hold no pickle and `--resume` never unpickles; the trainer's failures are one clear line.

- a checkpoint is safetensors and JSON only; a checkpoint folder with a booby-trapped pickle is refused and its
  payload never runs;
- a full disk while writing a checkpoint names the folder and the previous, intact checkpoint;
- a missing JSONL, a nonexistent init.path: one-line errors from `python -m train`, no traceback;
- a task whose every image fails to decode is counted as skipped under its own name (not logged as loss 0.0
  under another task);
- accelerate's checkpointing INFO lines do not reach the console; our one-line checkpoint message does.
"""

import errno
import json
import os
import pickle

import pytest
from PIL import Image

import train_helpers as H
from train import runs


def booby_trap(path, marker):
    """A pickle whose loading creates `marker` (os.system-free: it calls open(marker, 'w'))."""

    class Trap:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(path, "wb") as f:
        pickle.dump(Trap(), f)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("safety")
    data = H.make_dataset(tmp / "data", tasks=("t2i", "caption"), per_task=4)
    cfg = H.base_config(
        tmp,
        data,
        train={
            "mode": "lora",
            "max_steps": 2,
            "batch_size": 2,
            "lr": 1e-3,
            "warmup_steps": 0,
            "lora": {"rank": 4, "alpha": 8},
        },
        checkpoint={"every": 2, "keep": 3},
    )
    path = H.write_config(tmp / "config.yaml", cfg)
    proc = H.run_cli(path)
    return tmp, cfg, path, proc


@pytest.mark.slow
def test_checkpoint_is_safetensors_and_json_only(lora_run):
    _, cfg, _, proc = lora_run
    ((step, folder),) = runs.list_checkpoints(cfg["run_dir"])
    names = sorted(os.listdir(folder))
    assert names == sorted([runs.TRAINABLE, runs.STATE, runs.OPTIMIZER, runs.RESUME, "rng_0.safetensors"])
    runs.refuse_pickles(folder)  # nothing to refuse
    resume = json.loads(open(os.path.join(folder, runs.RESUME)).read())
    assert resume["scheduler"]["last_epoch"] == step
    # the console: our one line per checkpoint, none of accelerate's INFO lines
    assert "accelerate.checkpointing" not in proc.stderr
    assert sum(f"checkpoint {folder}" in line for line in proc.stderr.splitlines()) == 1


@pytest.mark.slow
def test_resume_refuses_a_booby_trapped_pickle(lora_run, tmp_path):
    _, cfg, path, _ = lora_run
    # the trap works: plain unpickling runs it
    control = tmp_path / "control.pkl"
    booby_trap(control, tmp_path / "control_ran")
    with open(control, "rb") as f:
        pickle.load(f).close()
    assert (tmp_path / "control_ran").exists()

    ((_, folder),) = runs.list_checkpoints(cfg["run_dir"])
    trapped = tmp_path / "trapped"
    import shutil

    shutil.copytree(folder, trapped)
    marker = tmp_path / "payload_ran"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl"):  # what accelerate's save_state wrote
        booby_trap(trapped / name, marker)
    proc = H.run_cli(path, "--set", "train.max_steps=3", "--resume", str(trapped), check=False)
    assert proc.returncode != 0
    assert "refused, it holds pickle files (custom_checkpoint_0.pkl, random_states_0.pkl)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists(), "the pickle's payload ran"

    # a pickle under a harmless name is found by its bytes
    os.remove(trapped / "custom_checkpoint_0.pkl")
    os.remove(trapped / "random_states_0.pkl")
    booby_trap(trapped / "notes.txt", marker)
    with pytest.raises(runs.TrainingError, match=r"notes\.txt"):
        runs.refuse_pickles(str(trapped))
    assert not marker.exists()


def test_disk_full_while_writing_a_checkpoint(tmp_path, monkeypatch):
    data = H.make_dataset(tmp_path / "data", tasks=("t2i",), per_task=4)
    cfg = H.base_config(
        tmp_path,
        data,
        train={"mode": "lora", "max_steps": 4, "batch_size": 2, "lora": {"rank": 4, "alpha": 8}},
        checkpoint={"every": 2, "keep": 3},
    )
    real = runs.save_tensors

    def full_disk_at_step_4(path, tensors, metadata):
        if metadata.get("step") == "4" or "/.tmp-step_00000004/" in path:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(path, tensors, metadata)

    monkeypatch.setattr(runs, "save_tensors", full_disk_at_step_4)
    with pytest.raises(runs.TrainingError) as err:
        H.train_in_process(cfg, tmp_path)
    previous = runs.checkpoint_dir(cfg["run_dir"], 2)
    message = str(err.value)
    assert message.startswith(f"no space left on {os.path.join(cfg['run_dir'], 'checkpoints')}")
    assert f"the previous checkpoint {previous} is intact" in message
    assert [s for s, _ in runs.list_checkpoints(cfg["run_dir"])] == [2]
    assert not [n for n in os.listdir(os.path.dirname(previous)) if n.startswith(".tmp-")]  # no half-written one
    runs.refuse_pickles(previous)
    assert runs.read_state(previous)["step"] == 2 and runs.read_trainable(previous)[0]


@pytest.mark.slow
def test_missing_files_are_one_line_errors(tmp_path):
    data = H.make_dataset(tmp_path / "data", tasks=("t2i",), per_task=2)
    cfg = H.base_config(tmp_path, data)
    path = H.write_config(tmp_path / "config.yaml", cfg)
    missing = str(tmp_path / "nope.jsonl")
    proc = H.run_cli(path, "--set", f"data.files=[{data}, {missing}]", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip().splitlines()[-1] == f"config error: data.files[1]: {missing} does not exist "
        "(a JSONL file, one record per line)"
    )
    nowhere = str(tmp_path / "no_model")
    proc = H.run_cli(path, "--set", f"init.path={nowhere}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"config error: init.path: {nowhere} does not exist")
    proc = H.run_cli(path, "--resume", str(tmp_path / "no_checkpoint"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "neither a run folder nor a checkpoint folder" in proc.stderr.strip().splitlines()[-1]


def test_a_task_with_no_decodable_image_is_skipped_under_its_own_name(tmp_path, caplog):
    data_file = H.make_dataset(tmp_path / "data", tasks=("t2i",), per_task=4)
    # a caption task whose every image has a valid header but truncated pixels
    good = Image.new("RGB", (32, 32), (200, 30, 30))
    rows = []
    for i in range(4):
        p = tmp_path / "data" / f"trunc{i}.png"
        good.save(p)
        p.write_bytes(p.read_bytes()[:60])
        rows.append({"task": "caption", "sources": [str(p)], "caption": f"broken {i}"})
    with open(data_file, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    cfg = H.base_config(
        tmp_path,
        data_file,
        train={"mode": "lora", "max_steps": 4, "batch_size": 2, "lora": {"rank": 4, "alpha": 8}},
        data={
            "files": [data_file],
            "resolution": 32,
            "bucket_step": 16,
            "text_length": 16,
            "num_workers": 0,
            "ratios": {"t2i": 0.75, "caption": 0.25},
        },
        checkpoint={"every": 4, "keep": 1},
    )
    import logging

    with caplog.at_level(logging.WARNING, logger="train"):
        H.train_in_process(cfg, tmp_path)
    metrics = H.read_metrics(cfg["run_dir"])
    micro = [m for line in metrics for m in line["micro"]]
    assert {m["task"] for m in micro} == {"t2i", "caption"}
    for line in metrics:
        (m,) = line["micro"]
        if m["task"] == "caption":
            assert m.get("skipped") is True and line["loss"] is None  # not 0.0, not under t2i
        else:
            assert "skipped" not in m and line["loss"] > 0
    n_caption = sum(m["task"] == "caption" for m in micro)
    state = runs.read_state(runs.checkpoint_dir(cfg["run_dir"], 4))
    assert state["empty_batches"] == {"caption": n_caption}
    assert state["skipped"].get("corrupt_image", 0) == 4
    warned = [r.getMessage() for r in caplog.records if "no image could be decoded" in r.getMessage()]
    assert len(warned) == n_caption and all("(caption)" in w for w in warned)

    # nothing to stand in for it when the very first micro-batch has no image: one clear error naming the task
    only = dict(cfg, run_dir=str(tmp_path / "run2"), data=dict(cfg["data"], ratios={"caption": 1.0}))
    with pytest.raises(runs.TrainingError, match=r"first micro-batch \(caption\) could be decoded"):
        H.train_in_process(only, tmp_path, name="only_caption.yaml")
