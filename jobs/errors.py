"""The one error type a user sees: it carries a single line saying what is wrong and where."""


class InputError(Exception):
    """Bad input or environment: the CLI prints the message alone and exits 2."""
