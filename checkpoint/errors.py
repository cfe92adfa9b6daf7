"""The error a checkpoint that cannot be used raises: a plain ValueError whose message names the file, the
tensor or key and what was expected."""


class CheckpointError(ValueError):
    """A file that cannot be used as it is (damaged, incomplete, or not what the caller needs)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__module__ = "comfyui_lowbit"


# ComfyUI imports a custom-node pack under its folder's path (nodes.load_custom_node: sys.modules key
# "/.../custom_nodes/comfyui-lowbit"), so its error report, which shows `module.qualname` of the exception
# class (execution.full_type_name), would show that path; the package's name reads better.
CheckpointError.__module__ = "comfyui_lowbit"


class NotALowbitCheckpoint(CheckpointError):
    """The file is readable safetensors but carries no lowbit metadata."""
