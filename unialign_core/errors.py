"""The errors unialign_core raises on purpose."""

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
