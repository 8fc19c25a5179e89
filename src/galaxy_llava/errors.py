"""The one exception type for problems a user can fix (bad input, missing files, offline Hub)."""


class UserError(Exception):
    """A one-line, actionable error; the CLI prints it without a traceback (exit code 2)."""
