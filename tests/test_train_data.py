"""Tests for the training data: records, skips, images, buckets, hybrid sampler, resume, DDP shards, feature cache
(train/records.py, buckets.py, data.py, sampler.py, feature_cache.py)."""

import json
import logging
import math
import os
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from train import buckets as B
from train import data as D
from train import feature_cache as FC
from train import records as R
from train import sampler as S


def png(path, size=(40, 24), color=(200, 30, 30), mode="RGB"):
    """Write a tiny image; returns its path as str."""
    Image.new(mode, size, color).save(path)
    return str(path)


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return str(path)


def truncated_png(path, size=(40, 24)):
    """A PNG whose header is valid but whose pixel data is cut off (fails only at decode)."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# Records


def test_both_formats_parse_to_same_records(tmp_path):
    for name in ("a", "src", "tgt", "r1", "r2", "out"):
        png(tmp_path / f"{name}.png")
    up = write_jsonl(
        tmp_path / "up.jsonl",
        [
            {
                "image": ["a.png"],
                "conversations": [{"from": "human", "value": "a red cat"}, {"from": "gpt", "value": "<image>"}],
            },
            {
                "image": ["src.png", "tgt.png"],
                "instruction": "make it blue",
                "conversations": [{"from": "human", "value": "a blue cat"}, {"from": "gpt", "value": "<image>"}],
            },
            {
                "original_images": ["r1.png", "r2.png"],
                "generated_images": ["out.png"],
                "edit_prompt": ' \\"put them together\\" ',
                "caption": "two things",
            },
        ],
    )
    native = write_jsonl(
        tmp_path / "native.jsonl",
        [
            {"task": "t2i", "prompt": "a red cat", "target": "a.png", "meta": {"x": 1}},
            {
                "task": "edit",
                "instruction": "make it blue",
                "sources": ["src.png"],
                "target": "tgt.png",
                "caption": "a blue cat",
            },
            {
                "task": "compose",
                "prompt": "put them together",
                "sources": ["r1.png", "r2.png"],
                "target": "out.png",
                "caption": "two things",
            },
        ],
    )
    skips = R.SkipLog()
    a, b = R.read_jsonl(up, skips), R.read_jsonl(native, skips)
    assert skips.total == 0
    assert a == b
    assert a[0] == R.Record("t2i", "a red cat", [], str(tmp_path / "a.png"), "a red cat")
    assert a[1].sources == [str(tmp_path / "src.png")] and a[1].caption == "a blue cat"
    assert a[0].origin == f"{up}:1"
    # upstream perception data is TI2I: the file option maps it
    per = R.read_jsonl(up, skips, ti2i_task="perception")
    assert per[1].task == "perception"


def test_native_tasks_and_paths(tmp_path):
    (tmp_path / "img").mkdir()
    png(tmp_path / "img" / "x.png")
    absolute = png(tmp_path / "abs.png")
    f = write_jsonl(
        tmp_path / "n.jsonl",
        [
            {"task": "caption", "sources": ["img/x.png"], "caption": "a photo"},
            {"task": "vqa", "prompt": "what colour?", "sources": [absolute], "caption": "red"},
            {"task": "perception", "instruction": "depth map", "sources": ["img/x.png"], "target": absolute},
        ],
    )
    recs, skips = R.load_records([f])
    assert skips.total == 0
    assert [r.task for r in recs] == ["caption", "vqa", "perception"]
    assert recs[0].sources == [str(tmp_path / "img" / "x.png")] and recs[0].text == "" and recs[0].target is None
    assert recs[1].text == "what colour?" and recs[1].caption == "red" and recs[1].sources == [absolute]


def test_bad_records_are_skipped_counted_and_logged(tmp_path, caplog):
    png(tmp_path / "ok.png")
    png(tmp_path / "s.png")
    rows = [
        {"task": "t2i", "prompt": "fine", "target": "ok.png"},  # 1 ok
        "{not json",  # 2 bad_json
        {"task": "t2i", "prompt": "   ", "target": "ok.png"},  # 3 empty_text
        {"task": "edit", "instruction": "x", "sources": ["s.png"]},  # 4 bad_field (no target)
        {"task": "t2i", "prompt": 5, "target": "ok.png"},  # 5 bad_field (type)
        {"task": "dance", "prompt": "x", "target": "ok.png"},  # 6 unknown_task
        {"task": "compose", "prompt": "x", "sources": [], "target": "ok.png"},  # 7 bad_source_count
        {"task": "compose", "prompt": "x", "sources": ["s.png"] * 4, "target": "ok.png"},  # 8 bad_source_count
        {"task": "t2i", "prompt": "x", "target": "nope.png"},  # 9 missing_image
        "[1, 2]",  # 10 bad_field (not object)
        {"image": ["ok.png"]},  # 11 bad_field (no caption)
        {"image": ["s.png", "ok.png"], "instruction": ""},  # 12 empty_text
        {"hello": 1},  # 13 bad_field
        "",  # 14 blank: ignored
        {"task": "vqa", "prompt": "q?", "sources": ["s.png"]},  # 15 bad_field (no answer)
    ]
    f = write_jsonl(tmp_path / "bad.jsonl", rows)
    with open(f, "ab") as fh:
        fh.write(b"\xff\xfe bad utf8\n")  # 16 bad_json
    with caplog.at_level(logging.INFO, logger="train.data"):
        recs, skips = R.load_records([f])
    assert len(recs) == 1
    assert skips.summary() == {
        "bad_json": 2,
        "bad_field": 6,
        "empty_text": 2,
        "unknown_task": 1,
        "bad_source_count": 2,
        "missing_image": 1,
    }
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == skips.total
    for line, reason in [
        (2, "bad_json"),
        (3, "empty_text"),
        (4, "bad_field"),
        (6, "unknown_task"),
        (7, "bad_source_count"),
        (8, "bad_source_count"),
        (9, "missing_image"),
        (16, "bad_json"),
    ]:
        assert any(f"{f}:{line}: {reason}" in w for w in warnings), (line, reason)
    summaries = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "skipped 14" in r.getMessage()]
    assert len(summaries) == 1


def test_corrupt_images_skipped_at_load_without_raising(tmp_path, caplog):
    for i in range(3):
        png(tmp_path / f"g{i}.png", color=(i * 80, 0, 0))
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    truncated_png(tmp_path / "trunc.png")
    f = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"task": "t2i", "prompt": "p0", "target": "g0.png"},
            {"task": "t2i", "prompt": "bad1", "target": "garbage.png"},
            {"task": "t2i", "prompt": "bad2", "target": "trunc.png"},
            {"task": "t2i", "prompt": "p1", "target": "g1.png"},
            {"task": "t2i", "prompt": "p2", "target": "g2.png"},
        ],
    )
    recs, skips = R.load_records([f])
    assert len(recs) == 5  # corrupt pixels are not looked at when indexing
    ds = D.UniDataset(recs, buckets=[(32, 32)], t2i_as_caption=False, skips=skips)
    with caplog.at_level(logging.WARNING, logger="train.data"):
        out = [ds[i] for i in range(len(ds))]
    assert [s["text"] for s in out] == ["p0", "p1", "p1", "p1", "p2"]  # next readable record of the group
    assert out[1]["skipped"] == [(f"{f}:2", "corrupt_image"), (f"{f}:3", "corrupt_image")]
    assert skips.summary() == {"corrupt_image": 2}
    assert sum("corrupt_image" in r.getMessage() for r in caplog.records) == 2
    assert [s["text"] for s in (ds[1], ds[2])] == ["p1", "p1"]  # deterministic, no new log lines
    assert sum("corrupt_image" in r.getMessage() for r in caplog.records) == 2
    # the same holds with aspect buckets, where the header is read while indexing
    ds2 = D.UniDataset(recs, resolution=64, t2i_as_caption=False)
    assert ds2.skips.summary() == {"corrupt_image": 1}  # garbage.png: no header
    assert [ds2[i]["text"] for i in range(len(ds2))] == ["p0", "p1", "p1", "p2"]
    # a group with nothing decodable gives a stub that keeps its task and skips; collate makes an empty batch
    only_bad = D.UniDataset([recs[1]], buckets=[(32, 32)], t2i_as_caption=False)
    stub = only_bad[0]
    assert stub["undecodable"] and stub["task"] == "t2i" and stub["skipped"] == [(f"{f}:2", "corrupt_image")]
    assert D.collate([stub, stub]) == D.Batch("t2i", skipped=[(f"{f}:2", "corrupt_image")] * 2)
    assert D.collate([stub, stub]).empty
    assert D.collate([None]) is None
    # in a batch with a good sample the stub is left out and its skips are kept
    mixed = D.collate([stub, ds[0]])
    assert mixed.text == ["p0"] and mixed.skipped == [(f"{f}:2", "corrupt_image")] and not mixed.empty


# ---------------------------------------------------------------------------------------------------------------
# Images


def test_buckets_multiple_of_16_and_aspect():
    for res in (256, 512, 1024):
        buckets = B.make_buckets(res)
        assert (res, res) in buckets
        for w, h in buckets:
            assert w % 16 == 0 and h % 16 == 0
            assert max(w, h) / min(w, h) <= 2.0
            assert abs(w * h / res**2 - 1) < 0.1
            assert (h, w) in buckets
    buckets = B.make_buckets(512)
    assert B.pick_bucket(1000, 500, buckets) == max(buckets, key=lambda b: b[0] / b[1])
    w, h = B.pick_bucket(1600, 900, buckets)
    assert abs(math.log(w / h) - math.log(16 / 9)) < 0.05
    assert B.pick_bucket(300, 300, buckets) == (512, 512)
    with pytest.raises(ValueError):
        B.make_buckets(512, step=8)


def test_resize_cover_then_crop():
    img = Image.new("RGB", (100, 50), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 25, 50))  # left quarter red
    t = B.image_to_tensor(B.resize_to_bucket(img, (48, 48)))
    assert t.shape == (3, 48, 48) and t.dtype == torch.float32
    assert 0 <= t.min() and t.max() <= 1
    assert t[2].mean() > 0.95  # centre crop of a 2:1 image drops the red quarter
    left = B.image_to_tensor(B.resize_to_bucket(img, (48, 48), crop=(0.0, 0.5)))
    assert left[0, :, :10].mean() > 0.95


def test_alpha_and_grayscale_convert(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.save(tmp_path / "a.png")
    im = B.load_image(tmp_path / "a.png")
    assert im.mode == "RGB" and im.getpixel((1, 1)) == (255, 255, 255) and im.getpixel((0, 0)) == (255, 0, 0)
    png(tmp_path / "g.png", color=128, mode="L")
    assert B.load_image(tmp_path / "g.png").getpixel((0, 0)) == (128, 128, 128)
    png(tmp_path / "la.png", color=(0, 0), mode="LA")
    assert B.load_image(tmp_path / "la.png").getpixel((0, 0)) == (255, 255, 255)
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "d16.png")  # 16-bit depth map
    assert B.load_image(tmp_path / "d16.png").getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([10, 20, 30] + [0] * 765)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png")
    assert B.load_image(tmp_path / "p.png").getpixel((0, 0)) == (255, 255, 255)


def test_dataset_samples_share_bucket_and_collate(tmp_path):
    png(tmp_path / "wide.png", (40, 24))
    png(tmp_path / "tall.png", (24, 40))
    png(tmp_path / "sq.png", (30, 30))
    f = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"task": "edit", "instruction": "i", "sources": ["sq.png"], "target": "wide.png", "caption": "c"},
            {"task": "edit", "instruction": "j", "sources": ["tall.png"], "target": "wide.png"},
            {"task": "t2i", "prompt": "p", "target": "tall.png"},
        ],
    )
    recs, _ = R.load_records([f])
    ds = D.UniDataset(recs, resolution=64, random_crop=True, seed=3)
    assert ds.buckets == [(48, 80), (64, 64), (80, 48)]
    assert set(ds.groups) == {("edit", 1, (80, 48)), ("t2i", 0, (48, 80)), ("caption", 1, (48, 80))}
    s = ds[0]
    assert s["target"].shape == s["sources"][0].shape == (3, 48, 80)
    assert torch.equal(ds[0]["target"], s["target"])  # seeded crop
    batch = D.collate([ds[0], ds[1]])
    assert batch.task == "edit" and batch.target.shape == (2, 3, 48, 80)
    assert len(batch.sources) == 1 and batch.sources[0].shape == (2, 3, 48, 80)
    assert batch.text == ["i", "j"] and batch.caption == ["c", ""]
    cap = ds[ds.groups[("caption", 1, (48, 80))][0]]
    assert cap["task"] == "caption" and cap["target"] is None and cap["caption"] == "p"
    loader = D.make_loader(ds, S.HybridBatchSampler(ds.groups, 1, seed=0), num_workers=0)
    tasks = sorted(b.task for b in loader)
    assert tasks == ["caption", "edit", "edit", "t2i"]


# ---------------------------------------------------------------------------------------------------------------
# Sampler


def fake_groups():
    groups, start = {}, 0
    for key, n in [
        (("t2i", 0, (64, 64)), 403),
        (("t2i", 0, (80, 48)), 150),
        (("caption", 1, (64, 64)), 97),
        (("edit", 1, (64, 64)), 210),
        (("compose", 2, (64, 64)), 60),
        (("compose", 3, (64, 64)), 41),
    ]:
        groups[key] = list(range(start, start + n))
        start += n
    return groups


def group_of(groups):
    return {i: k for k, v in groups.items() for i in v}


def test_hybrid_batches_follow_ratios_single_group():
    groups = fake_groups()
    where = group_of(groups)
    ratios = {"t2i": 0.4, "caption": 0.2, "edit": 0.2, "compose": 0.2}
    s = S.HybridBatchSampler(groups, batch_size=4, ratios=ratios, seed=1)
    batches = [s.batch_at(k) for k in range(1000)]
    counts = {t: 0 for t in ratios}
    for b in batches:
        assert len(b) == 4
        keys = {where[i] for i in b}
        assert len(keys) == 1  # one task, one source count, one bucket
        counts[keys.pop()[0]] += 1
    for t, r in ratios.items():
        assert abs(counts[t] / 1000 - r) < 0.01, (t, counts[t])
    # evenly interleaved: no task runs longer than needed
    tasks = [where[b[0]][0] for b in batches]
    runs = [k for k in range(1, len(tasks)) if tasks[k] == tasks[k - 1]]
    assert all(tasks[k] == "t2i" and tasks[k - 2] != "t2i" for k in runs)  # at most 2 t2i in a row, others never
    # every record of a task is used once per cycle (apart from the batch remainder)
    t2i = [i for b in batches if where[b[0]][0] == "t2i" for i in b][: s.task_len["t2i"] * 4]
    assert len(set(t2i)) == len(t2i)
    # 50/50 strictly alternates, as upstream does
    alt = S.HybridBatchSampler(groups, 4, {"t2i": 1, "edit": 1})
    assert [where[alt.batch_at(k)[0]][0] for k in range(6)] == ["edit", "t2i"] * 3


def test_sampler_deterministic_and_epochs():
    groups = fake_groups()
    a = S.HybridBatchSampler(groups, 4, seed=5)
    b = S.HybridBatchSampler(groups, 4, seed=5)
    assert list(a) == list(b)
    assert a.epoch == 1 and len(list(a)) == len(a) and a.epoch == 2  # one epoch per iteration
    assert S.HybridBatchSampler(groups, 4, seed=6).batch_at(0) != b.batch_at(0) or S.HybridBatchSampler(
        groups, 4, seed=6
    ).batch_at(1) != b.batch_at(1)
    assert a.batch_at(3) != a.batch_at(3 + len(a))  # reshuffled next epoch


def test_sampler_resume_reproduces_remaining_order():
    groups = fake_groups()
    ratios = {"t2i": 0.5, "edit": 0.3, "caption": 0.2}
    full = S.HybridBatchSampler(groups, 4, ratios, seed=7)
    it = iter(full)
    for _ in range(37):
        next(it)
    state = full.state_dict()
    rest = []
    while len(rest) < 300:  # across epoch boundaries
        rest += list(full) if rest else list(it)
    resumed = S.HybridBatchSampler(groups, 4, ratios, seed=7)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON/torch checkpoint
    again = []
    while len(again) < len(rest):
        again += list(resumed)
    assert again[: len(rest)] == rest
    with pytest.raises(ValueError):
        S.HybridBatchSampler(groups, 4, ratios, seed=8).load_state_dict(state)
    # state for a prefetching DataLoader: the number of batches the loop actually consumed
    assert full.state_dict(step=37) == state


def test_ranks_get_disjoint_slices_of_global_batch():
    groups = fake_groups()
    single = S.HybridBatchSampler(groups, 6, seed=2)
    r0 = S.HybridBatchSampler(groups, 3, seed=2, rank=0, world_size=2)
    r1 = S.HybridBatchSampler(groups, 3, seed=2, rank=1, world_size=2)
    where = group_of(groups)
    for (a, b), g in zip(zip(r0, r1), single):
        assert len(a) == len(b) == 3 and not set(a) & set(b)
        assert a + b == g and len({where[i] for i in g}) == 1
    with pytest.raises(ValueError):
        S.HybridBatchSampler(groups, 3, rank=2, world_size=2)


# ---------------------------------------------------------------------------------------------------------------
# Feature cache


def test_feature_cache_roundtrip_and_content_keys(tmp_path):
    cache = FC.FeatureCache(tmp_path / "cache")
    img = pathlib.Path(png(tmp_path / "i.png"))
    k1 = cache.key(img, (64, 64), "sd3-vae")
    assert cache.get(k1) is None and k1 not in cache
    x = torch.randn(16, 8, 8).to(torch.bfloat16)
    cache.put(k1, x)
    assert k1 in cache and torch.equal(cache.get(k1), x) and cache.get(k1).dtype == torch.bfloat16
    assert cache.key(img, (64, 64), "sd3-vae") == k1
    assert cache.key(img, (80, 48), "sd3-vae") != k1
    assert cache.key(img, (64, 64), "other-vae") != k1
    png(img, color=(1, 2, 3))  # same path, new pixels
    assert cache.key(img, (64, 64), "sd3-vae") != k1
    kt = cache.key("a red cat", "t5-xxl")
    assert kt != cache.key("a red cat ", "t5-xxl") and kt != cache.key(str(img), "t5-xxl")
    with pytest.raises(ValueError):
        cache.get("../../etc/passwd")


def test_feature_cache_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    cache = FC.FeatureCache(tmp_path / "cache")
    key = cache.key("text", "enc")

    def killed(src, dst):
        raise KeyboardInterrupt  # the process dies between writing the temp file and publishing it

    monkeypatch.setattr(FC.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        cache.put(key, torch.ones(3))
    monkeypatch.undo()
    assert cache.get(key) is None and key not in cache
    assert [f for _, _, fs in os.walk(tmp_path / "cache") for f in fs] == []
    # a half-written final file (e.g. from a non-atomic writer) reads as a miss, not a crash
    os.makedirs(os.path.dirname(cache.path(key)), exist_ok=True)
    open(cache.path(key), "wb").write(b"\x10\x00\x00")
    assert cache.get(key) is None
    cache.put(key, torch.arange(4.0))
    assert torch.equal(cache.get(key), torch.arange(4.0))
