"""The test data in tests/data is a byte-for-byte copy of CI's ../shared (where that folder exists).

A fresh clone has no ../shared and runs on tests/data alone; on CI the copies are checked against their source,
so they cannot drift from it.
"""

import hashlib

import pytest

from tiny_models import DATA, GOLDEN, REFERENCE, SHARED

# Every file the suite reads, relative to tests/data (and to ../shared).
FILES = [
    "golden/README.md",
    *(
        f"golden/tiny_unialignment/{name}"
        for name in (
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "tokenizer/tokenizer.json",
            "tokenizer/tokenizer_config.json",
            "transformer/config.json",
            "transformer/diffusion_pytorch_model.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
            "vectors.json",
            "vectors.safetensors",
        )
    ),
    "reference/mask_token_emb.00-of-01.pth",
    "reference/sd3_medium_transformer_keys.tsv",
    "reference/unialignment_sd3m_transformer_keys.tsv",
    "reference/t5_tokenizer/special_tokens_map.json",
    "reference/t5_tokenizer/tokenizer.json",
    "reference/t5_tokenizer/tokenizer_config.json",
    "reference/t5_v1_1_xxl_encoder_config.json",
]


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_copies_are_in_the_repository():
    assert GOLDEN.is_relative_to(DATA) and REFERENCE.is_relative_to(DATA)
    missing = [name for name in FILES if not (DATA / name).is_file()]
    assert not missing, f"tests/data lacks {missing}"
    # Nothing in the golden folder that is not listed (a stray file would go unchecked).
    listed = {name for name in FILES if name.startswith("golden/tiny_unialignment/")}
    present = {p.relative_to(DATA).as_posix() for p in GOLDEN.rglob("*") if p.is_file()}
    assert present == listed


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent (a fresh clone): nothing to compare with")
@pytest.mark.parametrize("name", FILES)
def test_copy_equals_shared(name):
    source = SHARED / name
    assert source.is_file(), f"{source} is gone from ../shared: update tests/data and this list"
    assert digest(DATA / name) == digest(source), f"tests/data/{name} differs from {source}: copy it again"
