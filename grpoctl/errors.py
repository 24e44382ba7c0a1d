"""The one exception type users see.

Anything wrong with the user's input (a file, a flag, a model directory) raises
`GrpoctlError` with a one-line message; the CLI prints it as `error: ...` and
exits with status 2. Other exceptions are bugs and keep their traceback.
"""


class GrpoctlError(Exception):
    """A problem with the user's input, explained in one line."""

    exit_code = 2
