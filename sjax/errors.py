"""One exception type for bad input: the CLI prints it as one line and exits non-zero."""


class SjaxError(Exception):
    """A user-facing error: the message names the file or key and what is wrong."""
