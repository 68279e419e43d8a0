"""User-facing errors. Anything raised as :class:`TensorpressError` is printed by the CLI as one
line with a non-zero exit code; everything else is a bug."""


class TensorpressError(Exception):
    """An error caused by the user's input or environment (bad recipe, missing asset, ...)."""


class CheckpointError(TensorpressError):
    """A checkpoint is missing, truncated, tampered with or inconsistent with its config."""
