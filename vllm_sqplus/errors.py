"""User-facing errors: the CLI prints them as one line on stderr and exits non-zero."""


class SqplusError(Exception):
    """A problem with the user's input (path, checkpoint, architecture, shapes, data, config)."""
