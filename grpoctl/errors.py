"""The one exception type users see.

Anything wrong with the user's input (a file, a flag, a model directory) raises
`GrpoctlError` with a one-line message; the CLI prints it as `error: ...` and
exits with status 2. Other exceptions are bugs and keep their traceback.
"""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): how
    a library's long error becomes part of a one-line GrpoctlError."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


class GrpoctlError(Exception):
    """A problem with the user's input, explained in one line."""

    exit_code = 2
