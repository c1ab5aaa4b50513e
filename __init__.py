"""ComfyUI-UniAlignment: ComfyUI nodes for the UniAlignment model.

ComfyUI imports this file as the pack's entry point. It only registers the nodes: no pip calls,
no downloads, no model loading at import time.
"""

try:
    import folder_paths  # noqa: F401  (only importable inside ComfyUI)
except ImportError:
    # Imported outside ComfyUI, e.g. when pytest collects this folder as a package: no nodes.
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
