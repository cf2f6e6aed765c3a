"""The one exception users see for bad input: a clear, one-line message."""


class VoxblockError(ValueError):
    """Bad input or a refused operation, found before any block runs."""
