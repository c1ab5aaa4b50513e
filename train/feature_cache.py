"""Encoder outputs (VAE moments, T5 states, teacher features) on disk, keyed by content: `FeatureCache`, and
`cached`, which reads what is there and computes the rest."""

import hashlib
import logging
import os

from safetensors.torch import load, save

from unialign_core.files import write_bytes_atomic

log = logging.getLogger("train.data")


def cached(count, cache, keys, compute):
    """`count` encoder outputs with an optional cache: each is read from `cache` (a FeatureCache, or None for
    none) under `keys[i]` (needed only with a cache); the missing ones are computed at once by `compute(indices)`
    (one tensor per index, in that order) and stored. Returns (the `count` tensors, how many were computed)."""
    found = [cache.get(k) for k in keys] if cache is not None else [None] * count
    todo = [i for i, f in enumerate(found) if f is None]
    if todo:
        fresh = compute(todo)
        for j, i in enumerate(todo):
            found[i] = fresh[j]
            if cache is not None:
                cache.put(keys[i], fresh[j])
    return found, len(todo)


class FeatureCache:
    """Encoder outputs on disk, one safetensors file per content key, written atomically (temp file + os.replace).

    key = FeatureCache.key(pathlib.Path(image), (w, h), "sd3-vae")  or  FeatureCache.key(text, "t5-xxl", 256)
    """

    def __init__(self, directory):
        self.dir = str(directory)
        os.makedirs(self.dir, exist_ok=True)

    @staticmethod
    def key(*parts):
        """sha256 hex of the parts: os.PathLike -> the file's bytes, bytes as is, str as UTF-8 text, other
        values (ints, tuples, None) by repr. Each part is tagged with its kind and length."""
        h = hashlib.sha256()
        for p in parts:
            if isinstance(p, os.PathLike):
                fh = hashlib.sha256()
                with open(p, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        fh.update(chunk)
                kind, data = b"F", fh.digest()
            elif isinstance(p, (bytes, bytearray)):
                kind, data = b"B", bytes(p)
            elif isinstance(p, str):
                kind, data = b"S", p.encode("utf-8")
            else:
                kind, data = b"R", repr(p).encode("utf-8")
            h.update(kind + len(data).to_bytes(8, "little") + data)
        return h.hexdigest()

    def path(self, key):
        """File that holds `key` (keys are 64 hex characters)."""
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"not a FeatureCache key: {key!r}")
        return os.path.join(self.dir, key[:2], key + ".safetensors")

    def __contains__(self, key):
        return os.path.isfile(self.path(key))

    def get(self, key):
        """The cached tensor, or None on a miss (an unreadable file counts as a miss and is logged)."""
        p = self.path(key)
        try:
            with open(p, "rb") as f:
                return load(f.read())["t"]
        except FileNotFoundError:
            return None
        except Exception as e:
            log.warning("cache: unreadable %s (%s); treated as a miss", p, e)
            return None

    def put(self, key, tensor):
        """Store `tensor` (moved to CPU); readers see either no file or the complete one."""
        data = save({"t": tensor.detach().to("cpu").contiguous()})
        write_bytes_atomic(self.path(key), data, clean_stale=False)  # thousands of files per folder
