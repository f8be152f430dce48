"""The one error path of every command line: bad input from the user, or a failing environment
(a missing or unreadable file, a permission, a full disk), becomes ONE line ``error: ...`` on stderr
and exit code 2, never a traceback.

- ``UserError``: raised wherever a bad value is found, with a message naming it and what was expected;
- ``CliParser``: argparse whose errors (a bad flag, ``-bs eight``) are a UserError, not usage + message;
- ``cli_main``: wraps a command's ``main`` and turns a UserError, or an I/O failure that reached the top
  (OSError: permission, read-only folder, disk full, ...), into that line.
"""
import argparse
import functools
import sys


class UserError(Exception):
    """Bad input from the user (unknown name, missing file, malformed record, bad flag value)."""


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (through ``cli_main``): argparse would print the
    whole usage first."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def describe_os_error(e: OSError) -> str:
    """'<file>: <what went wrong>' for an OSError (filename and strerror when it has them)."""
    what = e.strerror or str(e) or type(e).__name__
    if e.filename is not None and e.filename2 is not None:
        return f"{e.filename} -> {e.filename2}: {what}"
    if e.filename is not None:
        return f"{e.filename}: {what}"
    return what


def one_line(message: str) -> str:
    """A message squeezed onto one line (a library's error text may span several)."""
    return " ".join(str(message).split())


def cli_main(main):
    """Run ``main``; a UserError or an OSError becomes one ``error:`` line on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            message = str(e)
        except OSError as e:  # the environment failed under us: permissions, read-only folder, disk full
            message = describe_os_error(e)
        print(f"error: {one_line(message)}", file=sys.stderr)
        sys.exit(2)

    return wrapper
