"""Errors of the data stage, reported without a traceback, each with the exit code it means.

Exit codes follow the project's rule: 2 when a rerun cannot help until the user fixes the config or
the data (a corrupt file, a missing column, a path that does not exist), 1 when it may (a download
or a listing that failed over the network). ``pretrain data`` and the workflow use ``exit_code``.
"""


class DataError(RuntimeError):
    """Bad input or an unusable output directory: the message names the file (and row) at fault."""

    exit_code = 2


class TransientDataError(DataError):
    """A failure a later rerun may not meet again (network, a remote listing): retry."""

    exit_code = 1
