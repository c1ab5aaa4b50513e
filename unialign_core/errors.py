"""The errors unialign_core raises on purpose, and the small checks every caller shares."""

import math
import numbers
from typing import Optional


class InputError(ValueError):
    """An argument the caller passed is wrong: an image of the wrong size, an unknown sampler, an empty prompt.

    `name` is the argument as the caller knows it ("image", "width/height", "reference 2", "length", ...);
    `problem` says what is wrong and what to do, without the name. The message is the name, `sep`, then the
    problem: "image: size 30x48 is not a multiple of 16; ..." or, with sep=" ", "steps must be at least 1, got 0".
    A ValueError, so that code catching ValueError catches it too."""

    def __init__(self, name: str, problem: str, sep: str = ": "):
        self.name = name
        self.problem = problem
        super().__init__(f"{name}{sep}{problem}")


class InputTypeError(InputError, TypeError):
    """An argument of the wrong type (e.g. an image that is neither a tensor nor a PIL image); also a TypeError."""


class CheckpointError(ValueError):
    """A weight file is missing, unreadable, or does not match the model. The message names the file.

    `path` is the file (or folder) at fault; `component` is the model part the problem is with when that is
    not just the file at `path`: "text_encoder", "vae" or "tokenizer" (e.g. none was found or given, or the text
    encoder does not fit the transformer), else None."""

    def __init__(self, path: str, problem: str, component: Optional[str] = None):
        self.path = path
        self.problem = problem
        self.component = component
        super().__init__(f"{path}: {problem}")


class Cancelled(RuntimeError):
    """Sampling stopped because the caller's cancel check asked for it."""


def check_finite(name: str, value):
    """`value`, or InputError(name) when it is not a finite number (NaN passes ComfyUI's min/max check and would
    silently turn guidance off or blacken an image)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InputError(name, f"must be a finite number, got {value!r}")
    return value


def check_text(name: str, text: str) -> str:
    """`text` unless it holds a lone surrogate (half of a UTF-16 pair, which no tokenizer reads): InputError(name)
    naming where. Other types pass unchanged (the callers check emptiness)."""
    if isinstance(text, str):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            code = f"\\u{ord(text[e.start]):04x}"
            raise InputError(
                name,
                f"holds a lone surrogate {code} at character {e.start}: half of a UTF-16 pair (e.g. of an emoji), "
                "which is not text; the client sent a broken string: send the whole character or remove it",
            ) from None
    return text
