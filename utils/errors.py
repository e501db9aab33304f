"""One error type for bad user input: the entry scripts turn it into one line on stderr and exit 2."""


class UsageError(Exception):
    """Bad input from the user (flags, files, checkpoints): reported in one line, exit code 2."""
