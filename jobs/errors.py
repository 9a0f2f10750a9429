"""The two failures a user sees, each a single line saying what is wrong and where, each with its exit code.

Bad input is never retried (the DAG's retry rule excludes its code); a transient fault is what a retry may
cure: the endpoint did not answer, S3 answered 5xx or throttled, a download failed.
"""


class InputError(Exception):
    """Bad input or configuration: the CLI prints the message alone and exits 2."""

    exit_code = 2


class TransientError(Exception):
    """A fault that may pass (network, S3 5xx or throttling, timeouts, failed downloads): exit 75 (EX_TEMPFAIL),
    which the DAG and the local runner retry with backoff."""

    exit_code = 75
