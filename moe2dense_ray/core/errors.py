"""One exception type for every problem the user can fix.

The CLI prints `error: <message>` on one line and exits with code 2 for these; anything else is a
bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a missing path, an unsupported model, an unknown method, a corrupt file..."""
