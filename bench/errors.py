"""The one exception type of tokenbench's user errors."""


class BenchError(Exception):
    """A user error: the CLI prints it as one line and exits with status 2; the Python API raises it."""
