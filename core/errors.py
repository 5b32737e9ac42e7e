"""Errors of the model layer, importable without torch (the command-line layer maps them to exit statuses)."""


class CheckpointError(ValueError):
    """A weight file that cannot be read or does not fit the model: the message names file and keys."""
