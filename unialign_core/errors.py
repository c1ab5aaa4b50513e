"""The errors unialign_core raises on purpose."""


class CheckpointError(ValueError):
    """A weight file is missing, unreadable, or does not match the model. The message names the file."""

    def __init__(self, path: str, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class Cancelled(RuntimeError):
    """Sampling stopped because the caller's cancel check asked for it."""
