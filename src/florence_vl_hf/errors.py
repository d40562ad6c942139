"""The package's expected failures. The `florence-vl` command prints a `CommandError` as one `error:` line and exits
with 1; anything else is a bug and gets a traceback (with `--debug`).

Exit codes of `florence-vl`: argparse's own usage errors (an unknown option, a missing argument, a value that does not
parse as its type or is not among its choices) exit 2 with the usage, as every argparse program does; a value that
parses but is refused (a count below its minimum, a non-empty output folder, options that do not go together) is an
expected failure, a `CommandError`: one `error:` line, exit 1."""


class CommandError(Exception):
    """An expected failure with a message naming its cause: bad input, a missing or unreadable file, a refused setting."""


def require_at_least(option: str, value, least) -> None:
    """Refuse an option's value below `least` (None, an option left out, passes) with a CommandError naming both."""
    if value is not None and value < least:
        raise CommandError(f"{option} must be at least {least}, got {value}")
