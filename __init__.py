"""comfyui-lowbit: 4-bit and 1.58-bit FLUX for ComfyUI through Triton kernels.

Inside ComfyUI this folder is a custom-node pack (NODE_CLASS_MAPPINGS); elsewhere it is the
`comfyui_lowbit` package (quantizers, kernels, the `lowbit` command) and needs no ComfyUI.
"""
__version__ = "0.1.0"

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
# ComfyUI serves this folder at /extensions/<pack folder>/; the frontend's node help reads docs/<NodeClass>.md
WEB_DIRECTORY = "./web"

try:
    import folder_paths  # noqa: F401  (present only when ComfyUI is running or on the path)

    _IN_COMFYUI = True
except ImportError:
    _IN_COMFYUI = False

if _IN_COMFYUI:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY", "__version__"]
