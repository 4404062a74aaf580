"""Errors a user's own config or data causes: the CLI and the jobs print their message, one line, no traceback."""


class UserError(Exception):
    """Base of every error the user can fix by changing their config or their data."""


class DataError(UserError, ValueError):
    """Input data that cannot be used as given (missing file, too few usable rows, ...)."""
