"""What every model layout module (flux, t5, clip_l, llm) reads the same way from a file's keys and shapes."""
import re


def find_prefix(keys, prefixes, markers) -> str:
    """The first of `prefixes` that some key carries in front of one of `markers` ('' if none)."""
    keys = list(keys)
    for p in prefixes:
        starts = tuple(p + m for m in markers)
        if any(k.startswith(starts) for k in keys):
            return p
    return ""


def shape_reader(shapes: dict, what: str):
    """shape(name) -> the tensor's shape as a tuple; a missing tensor says the file is not a complete `what`."""
    def shape(k):
        if k not in shapes:
            raise ValueError(f"missing tensor {k}; not a complete {what}")
        return tuple(shapes[k])

    return shape


def layer_count(shapes, pattern: str, what: str) -> int:
    """How many layers numbered by `pattern`'s group 1 the keys hold, refusing a gap (`what` names them)."""
    idx = {int(m.group(1)) for k in shapes if (m := re.match(pattern, k))}
    if idx != set(range(len(idx))):
        raise ValueError(f"{what} indices {sorted(idx)} are not 0..{len(idx) - 1}; the file is incomplete")
    return len(idx)
