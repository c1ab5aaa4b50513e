"""ComfyUI-UniAlignment: ComfyUI nodes for the UniAlignment model.

ComfyUI imports this file as the pack's entry point. The nodes live in `nodes/`; until they are
registered here, the pack loads cleanly and adds no nodes.
"""

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
