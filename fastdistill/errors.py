"""Exceptions raised by fastdistill.

Every error a user can cause (bad input, missing data, diverging optimisation) is a subclass of
:class:`FastDistillError`, so the CLI can print one clear line instead of a traceback.
"""

__all__ = ["FastDistillError", "DataError", "ShapeError", "DivergenceError", "ConfigError",
           "BackendUnavailableError"]


class FastDistillError(Exception):
    """Base class of every error fastdistill raises on purpose."""


class ConfigError(FastDistillError, ValueError):
    """An unknown dataset, model, strategy or an invalid option value."""


class DataError(FastDistillError):
    """A dataset file is missing, unreadable or fails its checksum."""


class ShapeError(FastDistillError, ValueError):
    """A tensor has the wrong shape or dtype for the operation."""


class DivergenceError(FastDistillError, FloatingPointError):
    """The outer loss, a gradient or a learning rate became NaN/inf or exploded.

    ``above_max_lr`` is True where a learned rate passed the ``max_lr`` bound (raising the bound
    is then one remedy), False for a NaN/inf.
    """

    def __init__(self, message: str, *, above_max_lr: bool = False):
        super().__init__(message)
        self.above_max_lr = above_max_lr


class BackendUnavailableError(FastDistillError, RuntimeError):
    """A backend was explicitly requested but cannot run here."""
