"""Error types with messages meant for users (the CLI prints them without a traceback)."""


class PrivregError(Exception):
    """Base class of privreg's user-facing errors."""


class InputError(PrivregError, ValueError):
    """Bad user input: missing/corrupt file, wrong dimension, NaN, empty mask, no overlap."""
