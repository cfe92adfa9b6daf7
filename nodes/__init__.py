"""ComfyUI nodes (the only package besides the root __init__ that imports ComfyUI)."""
NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
