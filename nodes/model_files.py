"""The model folders: registering them with ComfyUI's folder_paths, listing and finding the files the Loader and
LoRA nodes offer, and naming files to a client (relative to their models folder, never a server path)."""

import os
from typing import Optional

import folder_paths

from ..unialign_core.demo import bundled_models

FOLDER = "unialignment"
FROM_MODEL = "(from model)"
WEIGHT_EXTENSIONS = (".safetensors", ".sft")
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")  # never loaded: unpickling runs code
MAX_DEPTH = 3  # how deep the model folder is searched
PACK_FOLDER = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The README's conversion, typed in ComfyUI's folder: it runs in the pack's folder, whence ../../models is ComfyUI's.
CONVERT_COMMAND = (
    f"cd custom_nodes/{PACK_FOLDER} && python -m unialign_core.convert /path/to/UniAlignment "
    f"../../models/{FOLDER}/unialignment.safetensors"
)


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


def resolve_model(name: str):
    """The full path of a model file or folder (or of the bundled demo model), or None."""
    if name in bundled_models():
        return bundled_models()[name]
    rel = os.path.relpath(os.path.join(os.sep, name), os.sep)  # never above the folder
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


def pickle_problem(name: str, folder: str) -> Optional[str]:
    """Why a pickle file (.ckpt, .pt, ...) named as a file of models/<folder> is refused, or None for other names."""
    if not str(name).lower().endswith(PICKLE_EXTENSIONS):
        return None
    ext = os.path.splitext(str(name))[1]
    if folder == FOLDER:
        hint = (
            f"convert the downloaded upstream folder, in ComfyUI's folder: `{CONVERT_COMMAND}`; or use the "
            ".safetensors release"
        )
    else:
        hint = (
            f"use the .safetensors release of that file in models/{folder} (for T5: t5xxl_fp16.safetensors; for the "
            "VAE: the SD3 VAE's diffusion_pytorch_model.safetensors, renamed)"
        )
    return (
        f"{name!r} is a pickle file ({ext}), which this pack never loads (unpickling a file can run code in it); {hint}"
    )


def model_problem(name: str) -> Optional[str]:
    """What is wrong with the Loader's `model` choice (a pickle file, or nothing of that name), or None."""
    refused = pickle_problem(name, FOLDER)
    if refused or resolve_model(name) is not None:
        return refused
    return (
        f"{name!r} is not in models/{FOLDER} (searched: {searched(FOLDER)}). Download the glimmer16/UniAlignment "
        f"folder and convert it to our single file, in ComfyUI's folder: `{CONVERT_COMMAND}`; or put the "
        f"downloaded folder itself into models/{FOLDER}; then refresh the node list (R)."
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
