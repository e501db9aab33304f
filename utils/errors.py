"""One error type for bad user input: the entry scripts turn it into one line on stderr and exit 2."""


class UsageError(Exception):
    """Bad input from the user (flags, files, checkpoints): reported in one line, exit code 2."""


def read_text_lines(path, damaged: str) -> list:
    """The lines of the UTF-8 text file `path`. A file that is not UTF-8 is a UsageError:
    `damaged.format(why=...)`, `why` saying which byte at which offset, so each caller names its own file."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readlines()
    except UnicodeDecodeError as e:
        why = f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"
        raise UsageError(damaged.format(why=why)) from None
