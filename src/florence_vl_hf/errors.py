"""The package's expected failures. The `florence-vl` command prints a `CommandError` as one `error:` line and exits
with 1; anything else is a bug and gets a traceback (with `--debug`)."""


class CommandError(Exception):
    """An expected failure with a message naming its cause: bad input, a missing or unreadable file, a refused setting."""
