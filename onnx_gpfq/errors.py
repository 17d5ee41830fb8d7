"""The one exception type for problems the user can fix (bad input, bad options)."""


class UserError(Exception):
    """A problem with the user's input. The CLI prints ``str(err)`` as one line and exits 2."""
