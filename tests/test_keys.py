"""The full-size model matches the released key list, key for key and shape for shape."""

import torch

from tiny_models import REFERENCE
from unialign_core import UniAlignTransformer


def released_keys(name="unialignment_sd3m_transformer_keys.tsv"):
    keys = {}
    for line in (REFERENCE / name).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")[:2]
        keys[key] = tuple(int(x) for x in shape.split("x"))
    return keys


def meta_model(**config):
    with torch.device("meta"):
        return UniAlignTransformer(**config)


def test_full_size_training_model_matches_released_keys():
    model = meta_model(align_dim=3584)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == released_keys()


def test_inference_model_has_no_training_projectors():
    ours = {k: tuple(v.shape) for k, v in meta_model().state_dict().items()}
    released = {k: s for k, s in released_keys().items() if not k.startswith("siglip_adapter_")}
    assert ours == released
    params = sum(p.numel() for p in meta_model().parameters()) + 192 * 192 * 1536  # + position table
    assert round(params / 1e9, 3) == 2.159
