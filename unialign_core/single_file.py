"""Our single-file model format: one .safetensors with the transformer and a JSON metadata header.

Tensors: the transformer's weights under their released key names (training-only projectors
are never written). A file may also bundle a small text encoder and VAE under the
`text_encoder.` and `vae.` prefixes (the tiny shapes-world models do; full-size files don't).

Metadata (all strings, JSON where structured):
    format            "unialignment"
    format_version    "1" (the loader refuses a higher one, written by a newer pack: `check_format_version`)
    model_config      the transformer config
    vocab_size        text head size
    mask_id           id of the mask token
    scheduler_config  the flow-matching scheduler config
    mask_embedding    optional: JSON {"dtype": ..., "values": [...]} for T5's mask row
    tokenizer         optional: tokenizer.json text
    tokenizer_special optional: JSON {eos_token, pad_token, unk_token}
    text_encoder_config / vae_config   configs of bundled components
    text_length       optional: T5 tokens per prompt the model was trained with (the trainer's export writes
                      it; absent means 256, the published length); the modes default to it
"""

import json
import math
import struct
from typing import Dict, Optional, Sequence, Tuple

import torch

from .checkpoint import save_safetensors_atomic
from .errors import CheckpointError
from .files import NoSpaceError, begin_write, discard_write, finish_write
from .transformer import ALIGN_PREFIXES

FORMAT = "unialignment"
FORMAT_VERSION = "1"
BUNDLE_PREFIXES = ("text_encoder.", "vae.")


def check_format_version(metadata: Dict[str, str], path: str) -> None:
    """Raise CheckpointError(path) unless this code reads the file's `format_version` (absent: the first, "1").

    A newer version means the file was written by a newer release of this pack, which may store things this one
    would misread; it is refused with what to do."""
    version = metadata.get("format_version", "1")
    if not version.isdigit():
        raise CheckpointError(path, f"damaged metadata header: format_version {version!r}")
    if int(version) > int(FORMAT_VERSION):
        raise CheckpointError(
            path,
            f"made by a newer UniAlignment pack: its single-file format version is {version}, this pack reads "
            f"versions up to {FORMAT_VERSION}; update the UniAlignment node pack (unialign_core) to load it",
        )


def encode_tensor(t: torch.Tensor) -> str:
    """A small tensor as exact JSON (float32 holds bf16/fp16 values exactly)."""
    return json.dumps({"dtype": str(t.dtype).replace("torch.", ""), "values": t.float().flatten().tolist()})


# The dtypes `encode_tensor` writes (a stored vector is a float vector: T5's mask row).
VECTOR_DTYPES = ("float32", "float16", "bfloat16", "float64")


def decode_tensor(text: str, path: str = "metadata", key: str = "tensor", most: Optional[int] = None) -> torch.Tensor:
    """The tensor `encode_tensor` wrote, checked: JSON {"dtype": one of VECTOR_DTYPES, "values": at most `most`
    finite numbers}. Anything else raises CheckpointError(path) naming the metadata `key`."""
    damaged = "the file is damaged; export or convert it again"
    try:
        data = json.loads(text)
    except ValueError as e:
        raise CheckpointError(path, f"metadata {key} is not valid JSON ({e}); {damaged}") from None
    if not isinstance(data, dict) or set(data) != {"dtype", "values"}:
        raise CheckpointError(
            path, f'metadata {key} must be a JSON object {{"dtype": ..., "values": [...]}}; {damaged}'
        )
    if data["dtype"] not in VECTOR_DTYPES:
        raise CheckpointError(
            path,
            f"metadata {key} has dtype {str(data['dtype'])[:40]!r}, expected one of {', '.join(VECTOR_DTYPES)}; {damaged}",
        )
    values = data["values"]
    if not isinstance(values, list) or not values or (most is not None and len(values) > most):
        size = len(values) if isinstance(values, list) else type(values).__name__
        bound = f"1 to {most}" if most is not None else "at least 1"
        raise CheckpointError(
            path, f"metadata {key} holds {size} values, expected a list of {bound} numbers; {damaged}"
        )
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise CheckpointError(path, f"metadata {key} holds values that are not finite numbers; {damaged}")
    return torch.tensor(values, dtype=torch.float32).to(getattr(torch, data["dtype"]))


def single_file_metadata(
    config: dict, scheduler_config: dict, mask_id: int, mask_embedding: Optional[torch.Tensor] = None, tokenizer=None
) -> Dict[str, str]:
    """The metadata header of a single file (see the module docstring) for a transformer config."""
    config = dict(config, align_dim=None)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": json.dumps(config),
        "vocab_size": str(config["vocab_size"]),
        "mask_id": str(int(mask_id)),
        "scheduler_config": json.dumps({k: v for k, v in scheduler_config.items() if not k.startswith("_")}),
    }
    if mask_embedding is not None:
        metadata["mask_embedding"] = encode_tensor(mask_embedding)
    if tokenizer is not None:
        metadata["tokenizer"] = tokenizer.backend_tokenizer.to_str()
        special = {n: getattr(tokenizer, n) for n in ("eos_token", "pad_token", "unk_token")}
        metadata["tokenizer_special"] = json.dumps({k: v for k, v in special.items() if v is not None})
    return metadata


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
    **{d: n for d, n in ((getattr(torch, "float8_e4m3fn", None), "F8_E4M3"), (getattr(torch, "float8_e5m2", None),
                                                                           "F8_E5M2")) if d is not None},
}  # fmt: skip
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


class StreamingSafetensorsWriter:
    """Writes a .safetensors file one tensor at a time, so that no more than one tensor is ever in memory.

    The names, dtypes and shapes are declared up front (they make the header); then `write(name, tensor)` is
    called once per entry, in the declared order. The file appears under its name only when `close()` has
    checked that every entry was written (a temp file, then a rename); on an error the temp file is removed, and a
    full disk raises `files.NoSpaceError`. Use it as a context manager.
    """

    def __init__(self, path: str, entries: Sequence[Tuple[str, torch.dtype, Sequence[int]]],
                 metadata: Optional[Dict[str, str]] = None):  # fmt: skip
        self.path = path
        self.entries = [(name, dtype, tuple(int(n) for n in shape)) for name, dtype, shape in entries]
        if len({name for name, _, _ in self.entries}) != len(self.entries):
            raise ValueError(f"{path}: duplicate tensor names")
        header, offset = {}, 0
        for name, dtype, shape in self.entries:
            if dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}, which safetensors cannot store")
            size = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.total_bytes = 8 + len(raw) + offset
        self.tmp = begin_write(path)  # also removes the temporaries of a writer killed mid-write
        self.file = open(self.tmp, "wb")
        self.written = 0
        try:
            self.file.write(struct.pack("<Q", len(raw)) + raw)
        except BaseException as e:
            self.__exit__(type(e), e, None)
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.written >= len(self.entries):
            raise ValueError(f"{self.path}: {name!r} is more than the {len(self.entries)} declared tensors")
        want_name, want_dtype, want_shape = self.entries[self.written]
        if name != want_name or tensor.dtype != want_dtype or tuple(tensor.shape) != want_shape:
            raise ValueError(
                f"{self.path}: got {name!r} {tensor.dtype} {tuple(tensor.shape)}, expected {want_name!r} "
                f"{want_dtype} {want_shape} (tensors must come in the declared order)"
            )
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        if flat.numel():
            self.file.write(memoryview(flat.view(torch.uint8).numpy()))
        self.written += 1

    def close(self) -> str:
        if self.written != len(self.entries):
            missing = [name for name, _, _ in self.entries[self.written :]]
            raise ValueError(f"{self.path}: {len(missing)} declared tensors were not written (first: {missing[:5]})")
        self.file.close()
        finish_write(self.tmp, self.path)
        return self.path

    def abort(self, error: Optional[BaseException] = None) -> Optional[NoSpaceError]:
        """Close and remove the temporary; returns the `NoSpaceError` to raise when `error` was a full disk."""
        if not self.file.closed:
            try:
                self.file.close()
            except OSError:
                pass  # a full disk fails the flush too; the file is removed all the same
        return discard_write(self.tmp, self.path, error)

    def __enter__(self) -> "StreamingSafetensorsWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            try:
                self.close()
            except Exception as e:
                no_space = self.abort(e)
                if no_space is not None:
                    raise no_space from e
                raise
        else:
            no_space = self.abort(value)
            if no_space is not None:
                raise no_space from value


def _config_dict(module) -> dict:
    return {k: v for k, v in dict(module.config).items() if not k.startswith("_")}


def save_single_file(
    path: str,
    transformer,
    *,
    scheduler_config: dict,
    mask_id: int,
    mask_embedding: Optional[torch.Tensor] = None,
    tokenizer=None,
    text_encoder=None,
    vae=None,
    dtype: Optional[torch.dtype] = None,
    extra_metadata: Optional[Dict[str, str]] = None,
) -> str:
    """Write the single-file model atomically (a temp file, then a rename): never half-written.

    Args:
        path: destination `.safetensors`.
        transformer: a `UniAlignTransformer` (alignment projectors are left out).
        scheduler_config: the flow-matching scheduler config to ship with it.
        mask_id: the mask token id.
        mask_embedding: optional T5 mask-row vector to store in the header.
        tokenizer: optional tokenizer to embed (recommended for models with their own vocabulary).
        text_encoder / vae: optional components to bundle (small models only).
        dtype: optional dtype to store the weights in (e.g. torch.bfloat16).
    """
    if not path.endswith(".safetensors"):
        raise ValueError(f"output path {path!r} must end with .safetensors")
    tensors = {k: v for k, v in transformer.state_dict().items() if not k.startswith(ALIGN_PREFIXES)}
    metadata = single_file_metadata(_config_dict(transformer), scheduler_config, mask_id, mask_embedding, tokenizer)
    if text_encoder is not None:
        metadata["text_encoder_config"] = json.dumps(text_encoder.config.to_dict())
        for k, v in text_encoder.state_dict().items():
            if k != "encoder.embed_tokens.weight":  # tied to shared.weight
                tensors["text_encoder." + k] = v
    if vae is not None:
        metadata["vae_config"] = json.dumps(_config_dict(vae))
        tensors.update({"vae." + k: v for k, v in vae.state_dict().items()})
    metadata.update(extra_metadata or {})
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in tensors.items()
    }
    return save_safetensors_atomic(tensors, path, metadata)


def save_model(
    path: str,
    model,
    transformer=None,
    *,
    bundle: bool = False,
    dtype: Optional[torch.dtype] = None,
    extra_metadata: Optional[Dict[str, str]] = None,
) -> str:
    """`save_single_file` of a loaded model (a `UniAlignModel`): `transformer` (default: the model's own) with the
    model's scheduler config, mask id, mask-token embedding and tokenizer; `bundle` also stores its T5 and VAE."""
    return save_single_file(
        path,
        model.transformer if transformer is None else transformer,
        scheduler_config=model.scheduler_config,
        mask_id=model.mask_id,
        mask_embedding=model.mask_embedding,
        tokenizer=model.tokenizer,
        text_encoder=model.text_encoder if bundle else None,
        vae=model.vae if bundle else None,
        dtype=dtype,
        extra_metadata=extra_metadata,
    )
