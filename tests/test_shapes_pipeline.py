"""The embedded default, ``python -m train.shapes``: its tokenizer, teacher and start folder, and the quick CI
variant end to end (it must clear floors that an untrained or broken model misses)."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from tiny_models import REPO
from train.shapes import evaluate as ev
from train.shapes import start, teacher, vocab, world
from train.shapes.scorecard import QUICK_FLOORS


def test_every_world_text_is_in_the_vocabulary():
    from unialign_core.modes import PERCEPTION_PRESETS, VQA_TEMPLATE

    tok = vocab.build_tokenizer()
    texts = list(PERCEPTION_PRESETS.values())
    for split in ("train", "test"):
        for task in world.TASKS:
            for i in range(40):
                rec = world.make_record(0, i, task, split)[0]
                texts += [rec.get(k) for k in ("prompt", "instruction", "caption") if rec.get(k)]
                if task == "vqa":
                    texts.append(VQA_TEMPLATE.format(question=rec["prompt"]) + rec["caption"])
    assert vocab.unknown_words(tok, texts) == set()
    rng = __import__("numpy").random.default_rng(0)
    for _ in range(50):
        scene = world.sample_scene(rng)
        text = world.caption(scene, rng)
        ids = tok(text)["input_ids"]
        assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
        assert ev.parse_caption(tok.decode(ids, skip_special_tokens=True)) == ev.parse_caption(text)
    assert tok.convert_tokens_to_ids("<extra_id_0>") == len(tok) - 1


def test_teacher_is_a_clip_folder_the_trainer_loads(tmp_path):
    from train.teacher import Teacher

    tok = vocab.build_tokenizer()
    images = torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8)
    captions = [f"a {c} square" for c in ("red", "green", "blue", "white")] * 2
    model, stats = teacher.train_clip(images, captions, tok, steps=2, batch_size=4)
    assert stats["steps"] == 2
    loaded = Teacher.load(teacher.save_teacher(model, tok, str(tmp_path / "teacher")))
    assert loaded.kind == "clip" and loaded.dim == model.config.projection_dim
    assert loaded.image_features(images[:2].float() / 255).shape == (2, loaded.dim)
    assert loaded.text_features(captions[:3]).shape == (3, loaded.dim)


def test_start_folder_loads_as_an_upstream_checkpoint(tmp_path):
    from train.shapes.autoencoder import make_vae
    from train.shapes.text_encoder import make_t5
    from unialign_core import load_model

    tok = vocab.build_tokenizer()
    folder = start.write_start(str(tmp_path / "start"), tok, make_vae(), make_t5(len(tok)))
    model = load_model(folder)
    assert model.mask_id == len(tok) - 1
    assert model.transformer.config.vocab_size == len(tok)
    assert model.pixel_multiple <= 16


@pytest.mark.slow  # minutes: the whole quick job in a subprocess
def test_quick_main_job_learns_every_mode(tmp_path):
    out = tmp_path / "shapes"
    proc = subprocess.run(
        [sys.executable, "-m", "train.shapes", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads((out / "report.json").read_text())
    assert proc.returncode == 0, (report["figures"], proc.stderr[-3000:])
    for key, floor in QUICK_FLOORS.items():
        assert report["figures"][key] >= floor, key
    for mode in ("t2i", "caption", "vqa", "edit", "perception", "compose"):
        assert any(k.startswith(mode + "_") for k in report["figures"]), mode
    assert (out / "contact_sheet.png").stat().st_size > 0 and (out / "report.md").is_file()
    # the export is our single file with T5, VAE and tokenizer bundled: the ComfyUI Loader needs nothing else.
    # (load_model raises when a part is missing, so check the file itself, then load a copy alone in a new folder,
    # where no tokenizer/ beside it can stand in for the bundled one)
    check_bundled_export(out / "shapes.safetensors", tmp_path / "alone")


def check_bundled_export(export, alone):
    from safetensors import safe_open

    from unialign_core import load_model

    with safe_open(str(export), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert {"tokenizer", "text_encoder_config", "vae_config"} <= set(meta), sorted(meta)
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("vae.") for k in keys)
    alone.mkdir()
    shutil.copy(export, alone / export.name)
    model = load_model(str(alone / export.name))
    assert len(model.tokenizer) == len(vocab.build_tokenizer())
