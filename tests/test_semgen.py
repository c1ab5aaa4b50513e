"""SemGen-Bench harness (`python -m tools.semgen`): the official layout and names, resuming, atomic writes after a
SIGKILL, two gloo processes, the published settings, the multi-edit splitter and chain, --keep-aspect, --summarize.

The data is tests/data/semgen: the benchmark's semgen_bench.jsonl (150 rows) and its first three images."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_models import GOLDEN, REPO, copy_tree, golden_model
from tools import semgen
from unialign_core import ImageResult
from unialign_core.images import to_tensor

DATA = REPO / "tests" / "data" / "semgen"
FAST = ["--steps", "2", "--size", "32"]  # test-only overrides: the tiny model, in seconds
ROWS = [0, 1, 2]


def env():
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def args_for(out, name, *extra):
    return [
        "--bench",
        str(DATA),
        "--model",
        str(GOLDEN),
        "--out",
        str(out),
        "--name",
        name,
        "--rows",
        "0-2",
        "--no-progress",
        *FAST,
        *extra,
    ]


def expected_files():
    files = set()
    for task in semgen.TASKS:
        for key in ROWS:
            files.add(f"fullset/{task}/{key}.png")
            if task.startswith("edit"):
                files.add(f"fullset/{task}/{key}_SRCIMG.png")
    return files


def tree(run_dir: Path):
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file() and p.name != semgen.METADATA}


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def meta(run_dir):
    return json.loads((run_dir / semgen.METADATA).read_text())


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("semgen")
    assert semgen.main(args_for(out, "tiny")) == 0
    return out / "tiny"


def test_official_layout_and_names(clean_run):
    assert tree(clean_run) == expected_files()
    for rel in expected_files():
        assert semgen.png_ok(clean_run / rel), rel
        assert pixels(clean_run / rel).shape == (32, 32, 3), rel
    # the key is the 0-based line number: row 0 is image_id 1
    rows = semgen.read_bench(DATA)
    assert [r.key for r in rows[:3]] == [0, 1, 2] and [r.image_id for r in rows[:3]] == [1, 2, 3]
    assert rows[0].image == DATA / "images" / "1.jpg"  # the authors' absolute path is replaced
    for task in semgen.EDIT_TASKS:
        for key in ROWS:  # _SRCIMG is the source exactly as it was resized for the model
            with Image.open(DATA / "images" / f"{key + 1}.jpg") as im:
                want = np.asarray(im.convert("RGB").resize((32, 32)))
            np.testing.assert_array_equal(pixels(clean_run / f"fullset/{task}/{key}_SRCIMG.png"), want)
    # different prompts give different images; the edits differ from their source
    assert not np.array_equal(
        pixels(clean_run / "fullset/t2i_long/0.png"), pixels(clean_run / "fullset/t2i_long/1.png")
    )
    assert not np.array_equal(
        pixels(clean_run / "fullset/edit_complex/0.png"), pixels(clean_run / "fullset/edit_complex/0_SRCIMG.png")
    )
    m = meta(clean_run)
    assert m["settings"]["steps"] == 2 and m["settings"]["size"] == 32 and m["settings"]["seed"] == 0
    assert m["settings"]["multi_edit"] == "single" and m["settings"]["keep_aspect"] is False
    assert m["settings"]["published_protocol"] is False
    run = m["runs"][-1]
    assert run["rows"] == "0-2" and run["tasks"] == list(semgen.TASKS) and run["seed"] == 0
    assert run["made"] == 12 and run["files_written_per_process"] == [18]


def test_rerun_writes_nothing(clean_run):
    before = {rel: os.stat(clean_run / rel) for rel in expected_files()}
    assert semgen.main(args_for(clean_run.parent, "tiny")) == 0
    for rel, st in before.items():
        now = os.stat(clean_run / rel)
        assert (now.st_mtime_ns, now.st_ino, now.st_size) == (st.st_mtime_ns, st.st_ino, st.st_size), rel
    run = meta(clean_run)["runs"][-1]
    assert run["made"] == 0 and run["complete_before"] == 12 and run["files_written_per_process"] == [0]


def test_rerun_with_other_settings_is_refused(clean_run, capsys):
    assert semgen.main(args_for(clean_run.parent, "tiny")[:-4] + ["--steps", "3", "--size", "32"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "steps: 2 -> 3" in err and "--name" in err


KILLER = """
import io, os, signal, sys
from PIL import Image
import tools.semgen as s
real, count = Image.Image.save, [0]
def dying(self, fp, format=None, **params):
    count[0] += 1
    if count[0] == int(os.environ["KILL_AT"]):  # die in the middle of writing this image, wherever it goes
        data = io.BytesIO()
        real(self, data, format="PNG")
        half = data.getvalue()[: len(data.getvalue()) // 2]
        if isinstance(fp, (str, os.PathLike)):
            with open(fp, "wb") as f:
                f.write(half)
        else:
            fp.write(half)
            fp.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, fp, format, **params)
Image.Image.save = dying
sys.exit(s.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_killed_run_resumes_with_valid_pngs_only(tmp_path, clean_run):
    # file 10 is row 1's edit_multi result (its _SRCIMG, file 9, is already written)
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, *args_for(tmp_path, "k")],
        cwd=REPO,
        env=dict(env(), KILL_AT="10"),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    run_dir = tmp_path / "k"
    pngs = [p for p in run_dir.rglob("*.png")]
    assert len(pngs) == 9 and all(semgen.png_ok(p) for p in pngs)
    assert len(list(run_dir.rglob(".*.tmp"))) == 1  # the half-written file never got its real name
    assert not (run_dir / "fullset/edit_multi/1.png").exists()
    assert (run_dir / "fullset/edit_multi/1_SRCIMG.png").exists()

    assert semgen.main(args_for(tmp_path, "k")) == 0
    assert tree(run_dir) == expected_files()  # the temporary file is gone
    run = meta(run_dir)["runs"][-1]
    assert run["complete_before"] == 6 and run["made"] == 6  # row 1's edit_multi is redone
    for rel in expected_files():  # and everything is what an uninterrupted run makes
        assert semgen.png_ok(run_dir / rel)
        np.testing.assert_array_equal(pixels(run_dir / rel), pixels(clean_run / rel), err_msg=rel)


@pytest.mark.slow
def test_two_gloo_processes_write_each_file_once(tmp_path, clean_run):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(REPO / "train/configs/accelerate/ddp.yaml"),
            "--num_processes",
            "2",
            "--main_process_port",
            "29533",
            "-m",
            "tools.semgen",
            *args_for(tmp_path, "ddp"),
        ],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "ddp"
    assert tree(run_dir) == expected_files()
    run = meta(run_dir)["runs"][-1]
    assert run["processes"] == 2 and run["items_per_process"] == [6, 6]
    written = run["files_written_per_process"]
    assert all(n > 0 for n in written) and sum(written) == len(expected_files())  # no file made twice
    for rel in expected_files():  # seed + key: the same images as one process
        np.testing.assert_array_equal(pixels(run_dir / rel), pixels(clean_run / rel), err_msg=rel)


# ---- the published settings, the chain and --keep-aspect (the model's modes replaced by recording fakes) ----


@pytest.fixture
def fake_modes(monkeypatch):
    import unialign_core

    calls = []

    def fake_t2i(model, prompt, **kw):
        calls.append({"mode": "t2i", "text": prompt, **kw})
        return ImageResult(torch.full((1, 3, kw["height"], kw["width"]), 0.5), None)

    def fake_edit(model, image, instruction, **kw):
        x = to_tensor(image)
        out = ((1 - x) * 0.5 + 0.1 * len(calls)).clamp(0, 1)  # a different picture after every edit
        calls.append({"mode": "edit", "text": instruction, "input": x, "output": out, **kw})
        return ImageResult(out, None)

    monkeypatch.setattr(unialign_core, "text_to_image", fake_t2i)
    monkeypatch.setattr(unialign_core, "edit", fake_edit)
    monkeypatch.setattr(semgen, "load", lambda args, device, dtype: golden_model())
    return calls


def published_args(out, name, *extra):
    return ["--bench", str(DATA), "--model", str(GOLDEN), "--out", str(out), "--name", name, "--no-progress", *extra]


def test_published_settings_by_default(tmp_path, fake_modes):
    assert semgen.main(published_args(tmp_path, "pub", "--rows", "1")) == 0
    row = semgen.read_bench(DATA)[1]
    by_text = {c["text"]: c for c in fake_modes}
    assert len(fake_modes) == 4 and set(by_text) == set(row.texts.values())  # edit_multi as ONE instruction
    for task in semgen.TASKS:
        c = by_text[row.texts[task]]
        assert c["negative_prompt"] == semgen.NEGATIVE_PROMPT and c["steps"] == 50 and c["seed"] == 1
        if task in semgen.T2I_TASKS:
            assert c["mode"] == "t2i" and (c["width"], c["height"], c["guidance"]) == (512, 512, 7.0)
        else:
            assert c["mode"] == "edit" and c["guidance"] == 9.0
            src = pixels(tmp_path / "pub" / f"fullset/{task}/1_SRCIMG.png")
            with Image.open(DATA / "images" / "2.jpg") as im:
                assert im.size != (512, 512)
                want = np.asarray(im.resize((512, 512)))  # what the official script feeds
            np.testing.assert_array_equal(src, want)
            np.testing.assert_array_equal((c["input"][0].permute(1, 2, 0) * 255).round().byte().numpy(), src)
    assert semgen.NEGATIVE_PROMPT == (
        "low quality, blurry, low resolution, backlit, cartoon, animated, deformed, "
        "oversaturated, undersaturated, out of frame"
    )
    assert meta(tmp_path / "pub")["settings"]["published_protocol"] is True


def test_multi_edit_chain_and_keep_aspect(tmp_path, fake_modes):
    assert (
        semgen.main(
            published_args(
                tmp_path, "chain", "--rows", "0", "--tasks", "edit_multi", "--multi-edit", "chain", "--keep-aspect"
            )
        )
        == 0
    )
    run_dir = tmp_path / "chain"
    text = semgen.read_bench(DATA)[0].texts["edit_multi"]
    assert [c["text"] for c in fake_modes] == [
        "Change the green light's color to yellow for better visibility.",
        "Make the street sign text bold and larger for easier reading.",
        "Add a reflective texture to the traffic light casing.",
    ]
    assert "".join(c["text"] for c in fake_modes) == text
    for before, after in zip(fake_modes, fake_modes[1:]):  # each edit starts from the previous result
        assert torch.equal(after["input"], before["output"])
    # 500x400 at about 512^2 pixels, sides multiples of 16
    assert fake_modes[0]["input"].shape[-2:] == (464, 576)
    assert pixels(run_dir / "fullset/edit_multi/0_SRCIMG.png").shape == (464, 576, 3)
    for i, c in enumerate(fake_modes[:2], start=1):
        step = run_dir / semgen.STEPS_DIR / f"0_step{i}.png"
        np.testing.assert_array_equal(pixels(step), (c["output"][0].permute(1, 2, 0) * 255).round().byte().numpy())
    final = (fake_modes[2]["output"][0].permute(1, 2, 0) * 255).round().byte().numpy()
    np.testing.assert_array_equal(pixels(run_dir / "fullset/edit_multi/0.png"), final)
    s = meta(run_dir)["settings"]
    assert s["multi_edit"] == "chain" and s["keep_aspect"] is True and s["published_protocol"] is False
    # a rerun finds the chain complete (steps included) and makes nothing
    fake_modes.clear()
    assert (
        semgen.main(
            published_args(
                tmp_path, "chain", "--rows", "0", "--tasks", "edit_multi", "--multi-edit", "chain", "--keep-aspect"
            )
        )
        == 0
    )
    assert fake_modes == []


def test_splitter_on_all_150_rows():
    rows = semgen.read_bench(DATA)
    assert len(rows) == 150
    for row in rows:
        text = row.texts["edit_multi"]
        pieces = semgen.split_instructions(text)
        assert len(pieces) == 3, (row.key, pieces)
        assert all(p.strip() for p in pieces) and "".join(pieces) == text
        assert all(p.strip()[0].isupper() and p.strip()[-1] in ".!?" for p in pieces), pieces
    assert semgen.split_instructions('Say "hi." Then add a dog!Make it red.') == [
        'Say "hi." ',
        "Then add a dog!",
        "Make it red.",
    ]
    assert semgen.split_instructions("make it 3.5 times larger") == ["make it 3.5 times larger"]


def test_aspect_size():
    assert semgen.aspect_size(500, 400, 512) == (576, 464)
    assert semgen.aspect_size(512, 512, 512) == (512, 512)
    w, h = semgen.aspect_size(640, 360, 512)
    assert w % 16 == 0 and h % 16 == 0 and abs(w * h / 512**2 - 1) < 0.1 and abs(w / h - 16 / 9) < 0.1


# ---- --summarize ------------------------------------------------------------------------------------------


def write_scores(folder: Path, name: str, task: str, pairs):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}_{task}_score.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["data_type", "source_image", "generated_image", "instruction", "sementics_score", "quality_score"]
        )
        for i, (s, q) in enumerate(pairs):
            src = "" if task.startswith("t2i") else f"x/fullset/{task}/{i}_SRCIMG.png"
            writer.writerow([task, src, f"x/fullset/{task}/{i}.png", "an instruction, with a comma", s, q])


def test_summarize_hand_computed(tmp_path, capsys):
    method = tmp_path / "results" / "mine"
    scores = method / "qwen25vl" / "eval_results_AWQ"
    write_scores(scores, "mine", "t2i_long", [(4, 9), (1, 1)])  # overall: sqrt(36)=6, 1 -> 3.5
    write_scores(scores, "mine", "t2i_complex", [(8, 8), (2, 8), (0, 5)])  # overall 8, 4, 0 -> 4
    write_scores(scores, "mine", "edit_multi", [(9.0, 4.0)])  # overall 6
    write_scores(scores, "mine", "edit_complex", [(10, 10), (5, 5)])  # overall 10, 5 -> 7.5
    assert semgen.main(["--summarize", str(method)]) == 0
    out = capsys.readouterr().out
    result = json.loads((method / "semgen_summary.json").read_text())
    want = {
        "t2i_long": (2, 2.5, 5.0, 3.5),
        "t2i_complex": (3, 10 / 3, 7.0, 4.0),
        "edit_multi": (1, 9.0, 4.0, 6.0),
        "edit_complex": (2, 7.5, 7.5, 7.5),
    }
    for task, (n, sem, qual, overall) in want.items():
        t = result["tasks"][task]
        assert t["n"] == n
        assert math.isclose(t["semantics"], sem) and math.isclose(t["quality"], qual)
        assert math.isclose(t["overall"], overall)
    avg = result["average"]
    assert math.isclose(avg["semantics"], (2.5 + 10 / 3 + 9 + 7.5) / 4)
    assert math.isclose(avg["quality"], (5 + 7 + 4 + 7.5) / 4)
    assert math.isclose(avg["overall"], (3.5 + 4 + 6 + 7.5) / 4)
    assert result["complete"] is False  # fewer than 150 samples per task
    assert "t2i_long" in out and "3.500" in out and "5.250" in out and "fewer than 150" in out


def test_summarize_errors(tmp_path, capsys):
    assert semgen.main(["--summarize", str(tmp_path)]) == 2
    assert "run the official scorer first" in capsys.readouterr().err
    scores = tmp_path / "m" / "qwen25vl" / "eval_results_AWQ"
    write_scores(scores, "m", "t2i_long", [("n/a", 3)])
    assert semgen.main(["--summarize", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "sementics_score" in err


def test_bad_inputs_name_the_input(tmp_path, capsys):
    cases = [
        (["--bench", str(tmp_path), "--model", str(GOLDEN), "--out", str(tmp_path), "--name", "x"], "--bench"),
        (args_for(tmp_path, "x") + ["--rows", "0-150"], "--rows"),
        (args_for(tmp_path, "x") + ["--tasks", "t2i_long,edit"], "--tasks"),
        (args_for(tmp_path, "x")[:-4] + ["--size", "30", "--steps", "1"], "--size 30"),
        (args_for(tmp_path, "x") + ["--rows", "5"], "source image"),  # images/6.jpg is not in the test data
        (["--bench", str(DATA)], "--model"),
        (args_for(tmp_path, "x") + ["--device", "gpu"], "--device"),
        (args_for(tmp_path, "x") + ["--model", str(tmp_path / "nope.safetensors")], "model not found"),
    ]
    for argv, needle in cases:
        assert semgen.main(argv) == 2, argv
        assert needle in capsys.readouterr().err, needle


def test_rows_parsing():
    assert semgen.parse_rows("0-2,5,148-", 150) == [0, 1, 2, 5, 148, 149]
    assert semgen.compact_rows([0, 1, 2, 5, 148, 149]) == "0-2,5,148-149"
    assert semgen.parse_tasks("edit_complex,t2i_long") == ["t2i_long", "edit_complex"]


def test_multi_edit_workflow_chains_three_edits():
    api = json.loads((REPO / "workflows" / "api" / "multi_edit.json").read_text())
    edits = sorted((k for k, n in api.items() if n["class_type"] == "UniAlignEdit"), key=int)
    assert len(edits) == 3
    first = api[edits[0]]["inputs"]["image"][0]
    assert api[first]["class_type"] == "ImageScale"
    for before, after in zip(edits, edits[1:]):
        assert api[after]["inputs"]["image"] == [before, 0]
    saved = sorted(n["inputs"]["images"][0] for n in api.values() if n["class_type"] == "SaveImage")
    assert saved == edits  # every step's result is saved
    for k in edits:
        inputs = api[k]["inputs"]
        assert (inputs["steps"], inputs["guidance"], inputs["negative_prompt"]) == (50, 9.0, semgen.NEGATIVE_PROMPT)


def test_summarize_names_images_scored_twice(tmp_path, capsys):
    method = tmp_path / "mine"
    scores = method / "qwen25vl" / "eval_results_AWQ"
    for task in semgen.TASKS:
        write_scores(scores, "mine", task, [(4, 9)] * 150)
    assert semgen.main(["--summarize", str(method)]) == 0
    out = capsys.readouterr().out
    assert "note" not in out and json.loads((method / "semgen_summary.json").read_text())["complete"] is True
    # the scorer rerun with only the combined CSV deleted: every sample of a task scored again and appended
    with open(scores / "mine_edit_multi_score.csv", "a", newline="") as f:
        for i in range(150):
            csv.writer(f).writerow(["edit_multi", "", f"x/fullset/edit_multi/{i}.png", "again", 4, 9])
    assert semgen.main(["--summarize", str(method)]) == 0
    out = capsys.readouterr().out
    assert "fewer than" not in out  # 300 rows, not "fewer than 150 samples (300)"
    assert "edit_multi (300 rows for 150 images)" in out and "delete all five" in out
    t = json.loads((method / "semgen_summary.json").read_text())
    assert t["tasks"]["edit_multi"]["n"] == 300 and t["tasks"]["edit_multi"]["duplicates"] == 150
    assert t["complete"] is False


def test_other_settings_are_refused_before_the_model_is_loaded(tmp_path, fake_modes, monkeypatch, capsys):
    argv = published_args(tmp_path, "pub", "--rows", "1", "--tasks", "t2i_long")
    assert semgen.main(argv) == 0

    def no_load(args, device, dtype):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(semgen, "load", no_load)
    assert semgen.main(argv + ["--steps", "49"]) == 2
    assert "steps: 50 -> 49" in capsys.readouterr().err
    # what only the model knows is still checked, after loading it
    golden = golden_model()
    other = SimpleNamespace(
        pixel_multiple=golden.pixel_multiple, dtype=golden.dtype, text_length=golden.text_length + 1
    )
    monkeypatch.setattr(semgen, "load", lambda args, device, dtype: other)
    assert semgen.main(argv) == 2
    assert f"text_length: {golden.text_length} -> {golden.text_length + 1}" in capsys.readouterr().err


def test_the_model_is_known_by_name_and_content_not_by_path(tmp_path, fake_modes, capsys):
    def argv(model):
        return published_args(tmp_path / "out", "m", "--rows", "1", "--tasks", "t2i_long") + ["--model", str(model)]

    def made():
        return meta(tmp_path / "out" / "m")["runs"][-1]["made"]

    first = copy_tree(GOLDEN, tmp_path / "a" / "tiny_unialignment")
    assert semgen.main(argv(first)) == 0 and made() == 1
    recorded = meta(tmp_path / "out" / "m")["settings"]["model"]
    assert recorded["name"] == "tiny_unialignment" and recorded["size"] > 0 and len(recorded["fingerprint"]) == 64
    (tmp_path / "b").mkdir()
    moved = first.rename(tmp_path / "b" / "tiny_unialignment")
    assert semgen.main(argv(moved)) == 0 and made() == 0  # moved: resumes, nothing to make
    renamed = moved.rename(tmp_path / "b" / "renamed")
    assert semgen.main(argv(renamed)) == 0 and made() == 0  # the same content under another name
    with open(renamed / "transformer" / "config.json", "a") as f:
        f.write("\n")  # other weights (or settings) under the same name and place
    assert semgen.main(argv(renamed)) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "model: 'tiny_unialignment' (" in err and "-> 'renamed' (" in err

    # semgen_run.json of an older version recorded the absolute path: the same name still resumes
    path = tmp_path / "out" / "m" / semgen.METADATA
    old = json.loads(path.read_text())
    old["settings"]["model"] = "/where/it/was/tiny_unialignment"
    path.write_text(json.dumps(old))
    again = renamed.rename(tmp_path / "b" / "tiny_unialignment")
    assert semgen.main(argv(again)) == 0 and made() == 0
    old["settings"]["model"] = "/where/it/was/another_model"
    path.write_text(json.dumps(old))
    assert semgen.main(argv(again)) == 2
    assert "'/where/it/was/another_model' -> 'tiny_unialignment'" in capsys.readouterr().err


def test_file_identity(tmp_path):
    a, b, c = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    data = os.urandom(3 << 20)
    a.write_bytes(data)
    b.write_bytes(data)
    c.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one byte differs, in the last MiB
    ia, ib, ic = (semgen.file_identity(p) for p in (a, b, c))
    assert ia["name"] == "a.safetensors" and ia["size"] == 3 << 20
    assert semgen.same_file(ia, ib) and not semgen.same_file(ia, ic)
    assert semgen.same_file(str(tmp_path / "x" / "a.safetensors"), ia)  # an older run's absolute path: by name
    assert not semgen.same_file(str(a), ic)
    assert semgen.same_file(None, None) and not semgen.same_file(None, ia)
    missing = semgen.file_identity(tmp_path / "gone.safetensors")
    assert missing == {"name": "gone.safetensors", "path": str(tmp_path / "gone.safetensors")}
