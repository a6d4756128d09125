"""Errors of the data stage that are the user's to fix (bad input or config), reported without a traceback."""


class DataError(RuntimeError):
    """Bad input or an unusable output directory: message names the file (and row) at fault."""
