"""The ComfyUI services the nodes use: model folders, model management, dtype, progress, previews, cancel.

Works on ComfyUI from March 2024 to today: every newer feature is detected, never assumed.
"""

import contextlib
import logging
import os
import time
import weakref
from typing import Optional

import torch

import comfy.latent_formats
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.utils
import folder_paths

from ..unialign_core import DTYPES, CheckpointError, load_lora, load_model, lora_deltas
from ..unialign_core import InputError as CoreInputError
from ..unialign_core.demo import bundled_models
from ..unialign_core.errors import check_finite
from .image_types import InputError
from .preview import latent_to_rgb_image

log = logging.getLogger("UniAlignment")

FOLDER = "unialignment"
FROM_MODEL = "(from model)"
WEIGHT_EXTENSIONS = (".safetensors", ".sft")
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")  # never loaded: unpickling runs code
DTYPE_CHOICES = ["auto", "bf16", "fp16", "fp32"]
# How the transformer's block weights are stored ("default": in the compute dtype); computed in the dtype above.
WEIGHT_DTYPES = {
    "default": None,
    "fp8_e4m3fn": getattr(torch, "float8_e4m3fn", None),
    "fp8_e5m2": getattr(torch, "float8_e5m2", None),
}
WEIGHT_DTYPE_CHOICES = list(WEIGHT_DTYPES)
MAX_DEPTH = 3  # how deep the model folder is searched


# ---- folders ------------------------------------------------------------------------------


def register_folder(name: str) -> None:
    """Register models/<name> with folder_paths, keeping paths that extra_model_paths.yaml added."""
    paths, _ = folder_paths.folder_names_and_paths.get(name, ([], None))
    paths = list(paths)
    default = os.path.join(folder_paths.models_dir, name)
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[name] = (paths, set(folder_paths.supported_pt_extensions))


def register_folders() -> None:
    register_folder(FOLDER)
    # ComfyUI before mid 2024 knows only models/clip; the README points T5 files at models/text_encoders.
    if "text_encoders" not in folder_paths.folder_names_and_paths:
        register_folder("text_encoders")


def _folder_paths(name: str):
    try:
        return list(folder_paths.get_folder_paths(name))
    except KeyError:
        return []


def is_upstream_folder(path: str) -> bool:
    """A diffusers pipeline folder as published (UniAlignment, DualDiffusion)."""
    return os.path.isfile(os.path.join(path, "transformer", "config.json")) or os.path.isfile(
        os.path.join(path, "model_index.json")
    )


def list_models():
    """The bundled demo model, then single files and upstream-layout folders under every models/unialignment path."""
    names = set()
    for base in _folder_paths(FOLDER):
        if not os.path.isdir(base):
            continue
        for root, dirs, files in os.walk(base, followlinks=True):
            rel = os.path.relpath(root, base)
            depth = 0 if rel == "." else rel.count(os.sep) + 1
            if depth and is_upstream_folder(root):
                names.add(rel.replace(os.sep, "/"))
                dirs[:] = []
                continue
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < MAX_DEPTH else []
            for f in files:
                if f.lower().endswith(WEIGHT_EXTENSIONS):
                    names.add(f if depth == 0 else f"{rel.replace(os.sep, '/')}/{f}")
    return list(bundled_models()) + sorted(names, key=str.lower)


def _safe_relative(name: str) -> str:
    return os.path.relpath(os.path.join(os.sep, name), os.sep)


def resolve_model(name: str):
    """The full path of a model file or folder (or of the bundled demo model), or None."""
    if name in bundled_models():
        return bundled_models()[name]
    rel = _safe_relative(name)
    for base in _folder_paths(FOLDER):
        path = os.path.join(base, rel)
        if os.path.isfile(path) or (os.path.isdir(path) and is_upstream_folder(path)):
            return path
    return None


def _weight_files(folder: str):
    try:
        names = folder_paths.get_filename_list(folder)
    except KeyError:
        return []
    return [n for n in names if n.lower().endswith(WEIGHT_EXTENSIONS)]


def text_encoder_folders():
    return [f for f in ("text_encoders", "clip") if f in folder_paths.folder_names_and_paths]


def list_text_encoders():
    names = []
    for folder in text_encoder_folders():
        names += [n for n in _weight_files(folder) if n not in names]
    return sorted(names, key=str.lower)


def list_files(folder: str):
    return sorted(_weight_files(folder), key=str.lower)


def resolve_file(folders, name: str):
    for folder in folders:
        if folder in folder_paths.folder_names_and_paths:
            path = folder_paths.get_full_path(folder, name)
            if path:
                return path
    return None


def searched(folder: str) -> str:
    """The folders searched, as the client may see them (models/<folder>, never a server path)."""
    count = len(_folder_paths(folder))
    if not count:
        return f"models/{folder} (not registered)"
    return f"models/{folder}" + (f" and {count - 1} more folder(s) from extra_model_paths.yaml" if count > 1 else "")


def client_path(text: str) -> str:
    """`text` with every absolute model-folder path replaced by models/<folder>, so that a message sent to
    a client names files relative to their models folder and never shows where the server keeps them."""
    text = str(text)
    bases = []
    for name, entry in list(folder_paths.folder_names_and_paths.items()):
        bases += [(os.path.normpath(p), f"models/{name}") for p in entry[0]]
    bases.append((os.path.normpath(folder_paths.models_dir), "models"))
    for base, shown in sorted(bases, key=lambda b: -len(b[0])):
        if len(base) > 1:
            text = text.replace(base + os.sep, shown + "/").replace(base, shown)
    return text


CONVERT_HINT = (
    "convert it with `python -m unialign_core.convert /path/to/UniAlignment "
    "models/unialignment/unialignment.safetensors` (the downloaded upstream folder), or use the .safetensors release"
)


def pickle_message(input_name: str, name: str, folder: str) -> Optional[str]:
    """The refusal for a pickle file (.ckpt, .pt, ...) named as a model input, or None for other names."""
    if not str(name).lower().endswith(PICKLE_EXTENSIONS):
        return None
    ext = os.path.splitext(str(name))[1]
    hint = (
        CONVERT_HINT
        if folder == FOLDER
        else (
            f"use the .safetensors release of that file in models/{folder} (for T5: t5xxl_fp16.safetensors; for the "
            "VAE: the SD3 VAE's diffusion_pytorch_model.safetensors, renamed)"
        )
    )
    return (
        f"{input_name}: {name!r} is a pickle file ({ext}), which this pack never loads (unpickling a file "
        f"can run code in it); {hint}"
    )


def model_missing_message(name: str) -> str:
    refused = pickle_message("model", name, FOLDER)
    if refused:
        return refused
    return (
        f"model: {name!r} is not in models/{FOLDER} (searched: {searched(FOLDER)}). Put our single .safetensors "
        f"file there (made from the downloaded glimmer16/UniAlignment folder with `python -m unialign_core.convert "
        f"/path/to/UniAlignment models/{FOLDER}/unialignment.safetensors`) or that folder itself, then refresh."
    )


def file_signature(path) -> str:
    """Changes when a file or any file in a folder changes (for IS_CHANGED and the model cache)."""
    if not path:
        return ""
    try:
        if os.path.isfile(path):
            st = os.stat(path)
            return f"{st.st_mtime_ns}:{st.st_size}"
        stamps = []
        for root, _, files in os.walk(path, followlinks=True):
            for f in files:
                stamps.append(os.stat(os.path.join(root, f)).st_mtime_ns)
        return f"{max(stamps, default=0)}:{len(stamps)}"
    except OSError:
        return ""


@contextlib.contextmanager
def core_inputs(names: dict):
    """Inside, a unialign_core InputError about an argument in `names` (the core's argument name -> the node's
    input name, e.g. {"reference 2": "reference_3"}) is raised as the node's InputError naming that input, with
    the core's problem text. Other errors pass unchanged."""
    try:
        yield
    except CoreInputError as e:
        if e.name not in names:
            raise
        raise InputError(names[e.name], e.problem) from None


# ---- dtype and devices --------------------------------------------------------------------


def choose_dtype(choice: str, device) -> torch.dtype:
    """auto: what ComfyUI would pick for an SD3-class model on this device (fp32 on the CPU)."""
    if choice in DTYPES:
        return DTYPES[choice]
    if torch.device(device).type == "cpu":
        return torch.float32
    supported = [torch.bfloat16, torch.float16, torch.float32]
    try:
        return mm.unet_dtype(device=device, supported_dtypes=supported)
    except TypeError:  # a ComfyUI whose unet_dtype takes fewer arguments
        return mm.unet_dtype()


def output_device():
    return mm.intermediate_device()


def operations_for(weight_dtype) -> type:
    """ComfyUI's layer classes for our linear layers: ComfyUI can load them in part (lowvram) and stream the
    rest. manual_cast when weights are stored in another dtype than they compute in (fp8), as ComfyUI does."""
    return comfy.ops.manual_cast if weight_dtype is not None else comfy.ops.disable_weight_init


# ---- the model on the wire ----------------------------------------------------------------


class UniAlignWeights(torch.nn.Module):
    """The transformer and the VAE in one module, so that one ModelPatcher manages them together.

    Keys: transformer.*, vae.* (LoRA patches use transformer.<parameter name>). T5 has its own patcher."""

    def __init__(self, model):
        super().__init__()
        self.transformer = model.transformer
        self.vae = model.vae

    def get_dtype(self):
        return self.transformer.pos_embed.proj.weight.dtype


class TextEncoderWeights(torch.nn.Module):
    """T5 alone (keys text_encoder.*), for its own ModelPatcher: ComfyUI can unload it once a prompt is encoded."""

    def __init__(self, model):
        super().__init__()
        self.text_encoder = model.text_encoder
        self._dtype = model.dtype

    def get_dtype(self):
        return self._dtype


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def place_unmanaged(patcher) -> int:
    """Move the tensors a partial load leaves behind but that do not cast per call to the load device.

    ComfyUI's partial (lowvram) load keeps some comfy.ops layers on the offload device and casts their
    weights per call; those are left alone. Every other tensor (norms, embeddings, the position table, the
    VAE) must be on the compute device: plain torch layers are loaded whole. Returns how many were moved."""
    device = torch.device(patcher.load_device)
    moved = 0
    for module in patcher.model.modules():
        if getattr(module, "comfy_cast_weights", False):
            continue
        for param in module.parameters(recurse=False):
            if not _same_device(param.device, device):
                param.data = param.data.to(device)
                moved += 1
        for name, buffer in module.named_buffers(recurse=False):
            if not _same_device(buffer.device, device):
                module._buffers[name] = buffer.to(device)
                moved += 1
    return moved


def streamed_layers(patcher) -> list:
    """The names of the layers ComfyUI loaded in part: they stay on the offload device, cast per call."""
    return [n for n, m in patcher.model.named_modules() if hasattr(m, "prev_comfy_cast_weights")]


class UniAlignHandle:
    """What a UNIALIGN_MODEL wire carries: the model, the ModelPatcher of its transformer and VAE (with the
    LoRAs applied), and the ModelPatcher of its T5."""

    def __init__(self, model, patcher, key, name, loras=(), t5_patcher=None):
        self.model = model
        self.patcher = patcher
        self.t5_patcher = t5_patcher
        self.key = key
        self.name = name
        self.loras = tuple(loras)
        self._preview_factors = None

    def _load(self, patchers):
        mm.load_models_gpu(patchers)
        for patcher in patchers:
            place_unmanaged(patcher)

    def activate(self, text_encoder_each_step: bool = True):
        """Load the weights (with this handle's patches) onto the compute device; return the model.

        The linear layers are comfy.ops layers, so on a GPU too small for the model ComfyUI loads part of
        them and streams the rest (lowvram) instead of failing. text_encoder_each_step (understanding) loads
        T5 with the transformer, for every step. Otherwise (the image modes) T5 is loaded only around each
        T5 call and the transformer is asked for again after it: T5 is then not required, and ComfyUI
        unloads it whenever it needs the memory."""
        if text_encoder_each_step:
            self.model.text_encoder_scope = None
            self._load([self.t5_patcher, self.patcher])
        else:
            self.model.text_encoder_scope = self._text_encoder_scope
            self._load([self.patcher])
        return self.model

    @contextlib.contextmanager
    def _text_encoder_scope(self):
        self._load([self.t5_patcher])
        try:
            yield
        finally:
            self._load([self.patcher])  # T5 not named: ComfyUI may unload it from now on

    @property
    def pixel_multiple(self) -> int:
        return self.model.pixel_multiple

    def preview_factors(self):
        if self._preview_factors is None:
            self._preview_factors = self.model.fit_latent_rgb()
        return self._preview_factors

    def __repr__(self):
        loras = "".join(f" + {n}@{s:g}" for n, s in self.loras)
        return f"UniAlignHandle({self.name}{loras})"


_cache = weakref.WeakValueDictionary()  # every handle still alive somewhere (ComfyUI's node cache)
_last = {}  # and the last one loaded, kept alive


def load_handle(name, model_path, text_encoder_path, vae_path, dtype, weight_dtype=None) -> UniAlignHandle:
    """Load (or reuse) a model. The cache key covers the paths, their contents' stamps and the dtypes.

    The linear layers of the transformer and T5 are built from ComfyUI's comfy.ops (partial loading);
    weight_dtype (fp8) stores the transformer's block weights in it, computing in `dtype`."""
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    key = (
        model_path, file_signature(model_path), text_encoder_path, file_signature(text_encoder_path),
        vae_path, file_signature(vae_path), str(dtype), str(weight_dtype), str(load_device),
    )  # fmt: skip
    handle = _cache.get(key)
    if handle is not None:
        log.info("[UniAlign] reusing the loaded model %s (%s)", name, dtype)
        _last["handle"] = handle
        return handle
    _last.clear()  # let a model nobody uses any more go before loading the next
    started = time.monotonic()
    model = load_model(
        model_path,
        text_encoder=text_encoder_path,
        vae=vae_path,
        device=offload_device,
        dtype=dtype,
        weight_dtype=weight_dtype,
        operations=operations_for(weight_dtype),
    )
    patcher = comfy.model_patcher.ModelPatcher(
        UniAlignWeights(model), load_device=load_device, offload_device=offload_device
    )
    t5_patcher = comfy.model_patcher.ModelPatcher(
        TextEncoderWeights(model), load_device=load_device, offload_device=offload_device
    )
    handle = UniAlignHandle(model, patcher, key, name, t5_patcher=t5_patcher)
    _cache[key] = handle
    _last["handle"] = handle
    stored = f", block weights {weight_dtype}" if weight_dtype is not None else ""
    log.info("[UniAlign] loaded model %s (%s%s) in %.1f s", name, dtype, stored, time.monotonic() - started)
    return handle


_lora_cache = {}


def with_lora(handle: UniAlignHandle, lora_name: str, lora_path: str, strength: float) -> UniAlignHandle:
    """A new handle whose patcher is a clone of the input's plus the LoRA's weight deltas.

    The base weights are never changed: ComfyUI patches them when this clone is loaded and
    restores them when another clone (e.g. the base) is loaded next. The patch value `(delta,)`
    is the plain weight difference every ComfyUI version understands."""
    with core_inputs({"strength": "strength"}):  # NaN passes ComfyUI's min/max check and would blacken the image
        check_finite("strength", strength)
    key = (lora_path, file_signature(lora_path), handle.key, handle.loras)
    deltas = _lora_cache.get(key)
    if deltas is None:
        try:
            layers = load_lora(lora_path)
            deltas = lora_deltas(
                _ComputeDtypeView(handle.model.transformer, handle.model.dtype), layers, 1.0, lora_path
            )
        except CheckpointError as e:
            raise InputError("lora_name", client_path(f"{lora_name!r} does not fit this model: {e.problem}")) from None
        deltas = {f"transformer.{k}": v.to(handle.patcher.offload_device) for k, v in deltas.items()}
        _lora_cache.clear()
        _lora_cache[key] = deltas
    patcher = handle.patcher.clone()
    patched = patcher.add_patches({k: (v,) for k, v in deltas.items()}, strength)
    if len(patched) != len(deltas):
        missing = sorted(set(deltas) - {k if isinstance(k, str) else k[0] for k in patched})
        raise InputError("lora_name", f"{lora_name!r}: ComfyUI could not patch {missing[:5]}")
    clone = UniAlignHandle(
        handle.model,
        patcher,
        handle.key,
        handle.name,
        handle.loras + ((lora_name, strength),),
        t5_patcher=handle.t5_patcher,
    )
    clone._preview_factors = handle._preview_factors
    return clone


class _ComputeDtypeView:
    """The transformer's parameter shapes with fp8 ones shown in the compute dtype, so that LoRA deltas are
    made in that dtype (an fp8 delta would flush a LoRA's small values to zero); ComfyUI adds them in fp32."""

    def __init__(self, transformer, dtype):
        self.transformer, self.dtype = transformer, dtype

    def named_parameters(self):
        for name, p in self.transformer.named_parameters():
            low = p.is_floating_point() and p.element_size() == 1
            yield name, torch.empty(p.shape, dtype=self.dtype, device="meta") if low else p


# ---- progress, previews, cancel -----------------------------------------------------------


def cancel():
    """Raises ComfyUI's interrupt exception when the user pressed Cancel (or /interrupt was posted)."""
    mm.throw_exception_if_processing_interrupted()
    return False


def _make_previewer(handle):
    """A function latents -> ComfyUI preview tuple, or None when previews are off."""
    import latent_preview  # ComfyUI's module
    from comfy.cli_args import LatentPreviewMethod, args

    sd3 = getattr(comfy.latent_formats, "SD3", None)  # ComfyUI has SD3 support since June 2024
    if sd3 is not None:
        previewer = latent_preview.get_previewer(handle.patcher.load_device, sd3())
        if previewer is None:
            return None
        return lambda x0: previewer.decode_latent_to_preview_image("JPEG", x0.float())
    # ComfyUI without SD3 support: our own linear latent -> RGB fit.
    if args.preview_method == LatentPreviewMethod.NoPreviews:
        return None
    factors = handle.preview_factors()
    size = getattr(latent_preview, "MAX_PREVIEW_RESOLUTION", 512)
    return lambda x0: ("JPEG", latent_to_rgb_image(x0, factors), size)


class Progress:
    """The `callback(step, total, state)` for unialign_core: a ComfyUI progress bar with previews."""

    def __init__(self, handle=None, previews=True):
        self.bar = None
        self.total = None
        self.previewer = _make_previewer(handle) if (previews and handle is not None) else None

    def __call__(self, step, total, state=None):
        if self.bar is None or total != self.total:
            self.bar = comfy.utils.ProgressBar(total)
            self.total = total
        preview = None
        if self.previewer is not None and isinstance(state, torch.Tensor) and state.is_floating_point():
            try:
                preview = self.previewer(state)
            except Exception as e:  # a preview must never stop sampling
                log.warning("[UniAlign] preview failed, previews off for this run: %s", e)
                self.previewer = None
        self.bar.update_absolute(step, total, preview)
