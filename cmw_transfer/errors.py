"""The one exception type that means "the user's input is wrong".

The CLI turns it into a single ``error: ...`` line and exit code 2; anything else is a bug (exit 1).
"""


class UserError(Exception):
    """Bad input: a message that says what is wrong and what to do about it."""
