"""The one exception type for user mistakes.

A :class:`UserError` carries a message that names the thing that is wrong and how to fix it;
the CLI prints it on one line and exits non-zero instead of showing a traceback.
"""


class UserError(Exception):
    """Bad input from the user (path, file, config key, name...). ``str(e)`` is the message."""
