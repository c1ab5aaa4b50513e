"""Shapes world: determinism, held-out split, pixel evaluator accuracy, texts, edits and dataset files."""

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from train.shapes import evaluate as ev
from train.shapes import world as w


def scenes(n, seed=0, **kwargs):
    """n random scenes from one seed."""
    rng = np.random.default_rng(seed)
    return [w.sample_scene(rng, **kwargs) for _ in range(n)]


def read_rate(images, truths):
    """Fraction of images whose read-back scene equals the truth."""
    return np.mean([ev.read_scene(img) == s for img, s in zip(images, truths)])


# ------------------------------------------------------------------------------------------ world


def test_scene_rules_and_determinism():
    a, b = scenes(50, seed=3), scenes(50, seed=3)
    assert a == b and a != scenes(50, seed=4)
    for s in a:
        assert s.background in w.BACKGROUNDS and 1 <= len(s.shapes) <= w.MAX_SHAPES
        for attr in ("position", "colour", "kind"):
            assert len({getattr(x, attr) for x in s.shapes}) == len(s.shapes)
        assert all(x.colour in w.COLOURS and x.kind in w.KINDS and x.position in w.POSITIONS for x in s.shapes)
    assert np.array_equal(np.asarray(w.render(a[0])), np.asarray(w.render(b[0])))
    assert w.render(a[0]).size == (32, 32) and w.render(a[0], 64).size == (64, 64)
    assert not set(w.COLOURS) & set(w.BACKGROUNDS)


def test_shapes_never_overlap():
    for size in (32, 64):
        for s in scenes(30, seed=1, n_shapes=2):
            labels = w.label_map(s, size)
            for i, shape in enumerate(s.shapes):
                mask = w.shape_mask(shape.kind, shape.position, shape.size, size)
                assert (labels[mask] == i + 1).all()


def test_dataset_is_deterministic(tmp_path):
    p1 = w.make_dataset(tmp_path / "a", 24, seed=5)
    p2 = w.make_dataset(tmp_path / "b", 24, seed=5)
    p3 = w.make_dataset(tmp_path / "c", 24, seed=6)
    assert open(p1).read() == open(p2).read() != open(p3).read()
    for rec in map(json.loads, open(p1)):
        for rel in rec["sources"] + [rec.get("target")] * ("target" in rec):
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_held_out_split_never_overlaps(tmp_path):
    keys = {}
    for split in ("train", "test", "val"):
        path = w.make_dataset(tmp_path / split, 150, seed=0, split=split)
        recs = [json.loads(line) for line in open(path)]
        keys[split] = {w.Scene.from_dict(r["meta"]["scene"]).key() for r in recs}
        assert all(w.scene_split(w.Scene.from_dict(r["meta"]["scene"])) == split for r in recs)
    assert keys["train"] and keys["test"] and keys["val"]
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["val"] and not keys["val"] & keys["test"]
    all_scenes = {s.key(): s for s in scenes(2000, seed=9)}.values()
    held_out = np.mean([w.scene_split(s) == "test" for s in all_scenes])
    validation = np.mean([w.scene_split(s) == "val" for s in all_scenes])
    assert 0.1 < held_out < 0.3 and 0.05 < validation < 0.15


def test_dataset_records(tmp_path):
    path = w.make_dataset(tmp_path, 36, seed=1)
    recs = [json.loads(line) for line in open(path)]
    assert len(recs) == 36 and {r["task"] for r in recs} == set(w.TASKS)
    n_sources = {"t2i": 0, "caption": 1, "vqa": 1, "edit": 1, "perception": 1, "compose": 1}
    for r in recs:
        assert len(r["sources"]) == n_sources[r["task"]] and ("target" in r) == (r["task"] not in ("caption", "vqa"))
        for rel in r["sources"] + [r.get("target")] * ("target" in r):
            assert os.path.exists(os.path.join(os.path.dirname(path), rel))
        assert isinstance(r["caption"], str) and r["caption"]
        assert r.get("prompt") or r.get("instruction") or r["task"] == "caption"
        scene = w.Scene.from_dict(r["meta"]["scene"])
        shown = r["sources"][0] if r["task"] in ("caption", "vqa", "perception") else r["target"]
        if r["task"] != "perception":
            assert ev.read_scene(Image.open(tmp_path / shown)) == scene
        if r["task"] == "vqa":
            assert len(r["caption"].split()) == 1 and r["caption"] == r["meta"]["answer"]
        if r["task"] == "perception":
            truth = (w.edge_map if r["meta"]["map"] == "edge" else w.depth_map)(scene)
            assert np.array_equal(np.asarray(Image.open(tmp_path / r["target"])), np.asarray(truth))
            assert ev.read_scene(Image.open(tmp_path / shown)) == scene
        if r["task"] == "compose":
            ref = np.asarray(Image.open(tmp_path / r["sources"][0]))
            assert np.array_equal(ref, np.asarray(w.render_reference(scene.shapes[0])))


def test_dataset_loads_with_the_trainer_reader(tmp_path):
    data = pytest.importorskip("train.records")
    path = w.make_dataset(tmp_path, 24, seed=2)
    records, skips = data.load_records([path])
    assert len(records) == 24 and skips.total == 0
    assert {r.task for r in records} == set(w.TASKS)


# -------------------------------------------------------------------------------------- evaluator


@pytest.mark.parametrize("size", [32, 64])
def test_evaluator_reads_clean_renders(size):
    truths = scenes(200 if size == 32 else 60, seed=11)
    assert read_rate([w.render(s, size) for s in truths], truths) >= 0.98


def test_evaluator_reads_blurred_noisy_renders():
    truths = scenes(200, seed=12)
    images = [ev.degrade(w.render(s), seed=i) for i, s in enumerate(truths)]
    assert read_rate(images, truths) >= 0.95
    assert all(all(ev.score_t2i(img, s).values()) for img, s in list(zip(images, truths))[:50])


def test_evaluator_reads_small_shapes():
    truths = scenes(100, seed=13, sizes=w.SIZES)
    assert read_rate([w.render(s) for s in truths], truths) >= 0.98


def test_evaluator_accepts_tensors_and_arrays():
    s = scenes(1, seed=2)[0]
    img = w.render(s)
    arr = np.array(img)
    tensor = torch.from_numpy(arr).permute(2, 0, 1).float()[None] / 255
    assert ev.read_scene(arr) == ev.read_scene(tensor) == ev.read_scene(arr / 255.0) == s
    assert ev.read_scene(arr.astype(np.float32)) == ev.read_scene(tensor[0].permute(1, 2, 0)) == s


@pytest.mark.parametrize(
    "kind,key", [("recolour", "colour"), ("reshape", "shape"), ("move", "position"), ("background", "background")]
)
def test_evaluator_rejects_wrong_image(kind, key):
    rng = np.random.default_rng(21)
    for s in scenes(25, seed=20):
        _, _, wrong, _ = w.make_edit(rng, s, kind)
        assert all(ev.score_t2i(w.render(s), s).values())
        scores = ev.score_t2i(w.render(wrong), s)
        assert scores[key] is False
        assert all(v for k, v in scores.items() if k not in (key, "shape", "position"))


def test_evaluator_missing_shape():
    s = w.Scene("black", (w.Shape("circle", "red", "left"),))
    blank = w.render(w.Scene("black", ()))
    assert ev.score_t2i(blank, s) == {"colour": False, "shape": False, "position": False, "background": True}


def test_edge_f1():
    for s in scenes(20, seed=30):
        true = w.edge_map(s)
        assert ev.edge_f1(true, true) == 1.0
        assert ev.edge_f1(Image.new("RGB", true.size), true) == 0.0
        shifted = np.zeros_like(np.asarray(true))
        shifted[1:] = np.asarray(true)[:-1]  # one pixel down (shapes never touch the top or bottom)
        assert ev.edge_f1(shifted, true, tolerance=1) > 0.95
        assert ev.edge_f1(w.edge_map(s, 64), true) > 0.5  # resized to the truth's size
    a, b = w.Scene("black", (w.Shape("circle", "red", "left"),)), w.Scene("black", (w.Shape("cross", "red", "right"),))
    assert ev.edge_f1(w.edge_map(b), w.edge_map(a)) < 0.1


def test_depth_map_orders_nearness():
    s = w.Scene("gray", (w.Shape("circle", "red", "left", "large"), w.Shape("square", "blue", "right", "small")))
    depth = np.asarray(w.depth_map(s))[..., 0].astype(int)
    labels = w.label_map(s)
    assert depth[labels == 1].min() > depth[labels == 2].max() > depth[labels == 0].max()
    assert ev.depth_mae(w.depth_map(s), w.depth_map(s)) == 0.0
    assert ev.depth_mae(Image.new("RGB", (32, 32)), w.depth_map(s)) > 0.1


# ------------------------------------------------------------------------------------------ texts


def test_caption_parser_round_trips_every_template():
    examples = scenes(40, seed=40, sizes=w.SIZES) + scenes(10, seed=41, n_shapes=2)
    for s in examples:
        captions = w.all_captions(s)
        assert len(captions) == len(w.CAPTION_TEMPLATES) * 2 ** len(s.shapes)
        for text in captions:
            assert ev.parse_caption(text) == s, text
            assert all(ev.score_caption(text, s).values())


def test_score_caption_and_vqa_detect_errors():
    s = w.Scene("black", (w.Shape("circle", "red", "left"), w.Shape("square", "blue", "right")))
    good = "a red circle on the left and a blue square on the right on a black background"
    assert ev.score_caption(good, s)["all"]
    assert not ev.score_caption(good.replace("red", "green"), s)["colour"]
    assert not ev.score_caption(good.replace("circle", "cross"), s)["shape"]
    assert not ev.score_caption(good.replace("on the left", "in the middle"), s)["position"]
    assert not ev.score_caption("a red circle on the left on a black background", s)["all"]
    assert not ev.score_caption("nothing here", s)["all"]
    assert ev.score_vqa(" Red. ", "red") and ev.score_vqa("LEFT!", "left") and not ev.score_vqa("blue", "red")


def test_vqa_answers_are_true_single_words():
    rng = np.random.default_rng(50)
    for s in scenes(100, seed=51):
        for qtype in w.VQA_TEMPLATES:
            question, answer, _ = w.vqa(s, rng, qtype)
            assert question.endswith("?") and len(answer.split()) == 1
            if qtype == "colour":
                kind = next(k for k in w.KINDS if k in question)
                assert answer == next(x.colour for x in s.shapes if x.kind == kind)
            if qtype == "exists":
                colour, kind = re.findall(r"[a-z]+", question)[3:5]
                assert answer == ("yes" if any((x.colour, x.kind) == (colour, kind) for x in s.shapes) else "no")


# ------------------------------------------------------------------------------------------ edits


def fact_diff(src, tgt):
    """(facts only in src, facts only in tgt) with shapes as (colour, kind, position)."""
    a, b = ev.scene_facts(src), ev.scene_facts(tgt)
    return a - b, b - a


@pytest.mark.parametrize("kind", w.EDIT_KINDS)
def test_edits_change_exactly_what_they_say(kind):
    rng = np.random.default_rng(60)
    n_shapes = 2 if kind == "remove" else 1 if kind == "add" else None
    for s in scenes(20, seed=61, n_shapes=n_shapes):
        src, instruction, tgt, meta = w.make_edit(rng, s, kind)
        assert meta["kind"] == kind and meta["attribute"] == w.EDIT_ATTRIBUTES[kind]
        removed, added = fact_diff(src, tgt)
        if kind == "background":
            assert removed == {("background", meta["from"])} and added == {("background", meta["to"])}
        elif kind == "add":
            assert not removed and len(added) == 1 and len(tgt.shapes) == len(src.shapes) + 1
        elif kind == "remove":
            assert not added and len(removed) == 1 and len(tgt.shapes) == len(src.shapes) - 1
        else:
            (old,), (new,) = removed, added
            index = {"recolour": 0, "reshape": 1, "move": 2}[kind]
            assert (old[index], new[index]) == (meta["from"], meta["to"])
            assert [o for i, o in enumerate(old) if i != index] == [n for i, n in enumerate(new) if i != index]
        if meta["to"] not in ("present", "absent"):
            assert meta["to"] in instruction or (meta["to"] == "center" and "middle" in instruction)
        assert ev.score_edit(src, w.render(tgt), tgt, meta) == {"changed": True, "kept": True}
        assert ev.score_edit(src, ev.degrade(w.render(tgt)), tgt, meta) == {"changed": True, "kept": True}
        assert ev.score_edit(src, w.render(src), tgt, meta)["changed"] is False


def test_score_edit_detects_collateral_change():
    rng = np.random.default_rng(70)
    src = w.Scene("gray", (w.Shape("circle", "red", "left"), w.Shape("square", "blue", "right")))
    _, _, tgt, meta = w.make_edit(rng, src, "background")
    spoiled = w.Scene(tgt.background, (w.Shape("circle", "red", "left"),))
    assert ev.score_edit(src, w.render(spoiled), tgt, meta) == {"changed": True, "kept": False}


def test_captions_are_written_in_one_wording_and_prompts_in_many(tmp_path):
    recs = [json.loads(line) for line in open(w.make_dataset(tmp_path, 60, seed=3))]
    prompts = set()
    for r in recs:
        scene = w.Scene.from_dict(r["meta"]["scene"])
        if r["task"] in ("t2i", "caption", "edit", "compose"):
            assert r["caption"] == w.canonical_caption(scene)
            assert ev.parse_caption(r["caption"]) == scene
        if r["task"] == "t2i":
            assert r["prompt"] in w.all_captions(scene)
            prompts.add(r["prompt"].split(" a ")[0][:12])
    assert len(prompts) > 1  # t2i prompts keep their several wordings


# ------------------------------------------------------------------------- the held-out concepts


def test_evaluator_reads_every_kind_colour_position_and_size_held_out_ones_included():
    """The fixed evaluator, extended with the held-out colour and kind: every single-shape scene of the world,
    clean and blurred with noise, reads back whole (the issue's bar: >= 0.99 of true renders)."""
    truths = [
        w.Scene(bg, (w.Shape(kind, colour, position, size),))
        for colour in w.COLOURS
        for kind in w.KINDS
        for position in w.POSITIONS
        for bg in w.BACKGROUNDS
        for size in w.SIZES
    ]
    assert {w.NEW_COLOUR, w.NEW_KIND} <= set(w.COLOURS) | set(w.KINDS)
    assert read_rate([w.render(s) for s in truths], truths) == 1.0
    large = [s for s in truths if s.shapes[0].size == "large"]
    assert read_rate([ev.degrade(w.render(s), seed=i) for i, s in enumerate(large)], large) >= 0.99


def _words(record) -> set:
    texts = [record.get(k, "") for k in ("prompt", "instruction", "caption")]
    return set(re.findall(r"[a-z]+", " ".join(texts) + " " + json.dumps(record["meta"])))


def test_the_base_vocabulary_never_shows_the_held_out_concepts(tmp_path):
    path = w.make_dataset(tmp_path, 240, seed=4, vocab=w.BASE)
    with open(path) as f:
        records = [json.loads(line) for line in f]
    assert {r["task"] for r in records} == set(w.TASKS)
    for r in records:
        assert not {w.NEW_COLOUR, w.NEW_KIND} & _words(r), r
    for name in os.listdir(tmp_path / "train_images"):  # and no pixel of the held-out colour
        arr = np.asarray(Image.open(tmp_path / "train_images" / name).convert("RGB")).reshape(-1, 3)
        assert not (arr == np.asarray(w.COLOURS[w.NEW_COLOUR])).all(axis=1).any(), name


@pytest.mark.parametrize("concept", [("colour", w.NEW_COLOUR), ("kind", w.NEW_KIND)])
@pytest.mark.parametrize("task", ["t2i", "caption", "vqa", "edit", "compose"])
def test_concept_records_use_the_concept(task, concept):
    attribute, value = concept
    for i in range(15):
        rec, _, _ = w.make_record(3, i, task, "test", concept=concept)
        scene = w.Scene.from_dict(rec["meta"]["scene"])
        assert any(getattr(s, attribute) == value for s in scene.shapes), rec
        if task == "edit":  # the edit introduces the concept: the source lacks it
            source = w.Scene.from_dict(rec["meta"]["source_scene"])
            assert not any(getattr(s, attribute) == value for s in source.shapes), rec
            assert value in rec["instruction"] or rec["meta"]["edit"]["kind"] == "add", rec
        if task == "vqa":  # the question or the answer names it
            assert value in rec["prompt"] + " " + rec["caption"] or rec["meta"]["question_type"] == "position", rec
        if task in ("t2i", "caption"):
            assert value in rec.get("prompt", "") + " " + rec["caption"], rec
