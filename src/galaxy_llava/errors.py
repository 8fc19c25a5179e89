"""The one exception type for problems a user can fix (bad input, missing files, offline Hub)."""


class UserError(Exception):
    """A one-line, actionable error; the CLI prints it without a traceback (exit code 2)."""

# The exit code of a command that finished but skipped inputs it could not read (``catalogue``,
# ``describe``): 0 is all done, 2 a refused command, 3 done with some inputs skipped.
EXIT_SKIPPED = 3
