"""Absolute paths in a run's config."""

import os

from .config import Config


def absolute_paths(cfg: Config) -> Config:
    """Resolve relative paths against the working directory (the saved config must work from anywhere)."""

    def fix(p):
        return os.path.abspath(p) if isinstance(p, str) and p else p

    cfg.run_dir = fix(cfg.run_dir)
    for name in ("path", "text_encoder", "vae", "tokenizer", "mask_embedding"):
        setattr(cfg.init, name, fix(getattr(cfg.init, name)))
    cfg.data.files = [
        dict(f, path=fix(f["path"]), **({"root": fix(f["root"])} if f.get("root") else {}))
        if isinstance(f, dict)
        else fix(f)
        for f in cfg.data.files
    ]
    cfg.data.cache_dir = fix(cfg.data.cache_dir)
    cfg.teacher.path = fix(cfg.teacher.path)
    cfg.validation.images = [fix(p) for p in cfg.validation.images]
    return cfg
