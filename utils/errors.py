"""User-facing errors: the CLIs print one line and exit with code 2."""
import functools
import sys


class UserError(Exception):
    """Bad input from the user (unknown name, missing file, malformed record, bad flag value)."""


def cli_main(main):
    """Run ``main``; turn a UserError into one clear line on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
