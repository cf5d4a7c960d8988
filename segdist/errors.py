"""The exceptions that end a command without a traceback.

A :class:`UserError` carries a message that names the thing that is wrong and how to fix it;
the CLI prints it on one line and exits 2. :class:`Paused` is not an error: the run saved a
state on a stop signal and exits with :data:`REQUEUE_EXIT` so a scheduler can requeue it.
"""

REQUEUE_EXIT = 75
"""Exit status of a run paused by SIGUSR1/SIGTERM after saving its state (EX_TEMPFAIL: try again)."""


class UserError(Exception):
    """Bad input from the user (path, file, config key, name...). ``str(e)`` is the message."""


class Paused(Exception):
    """The run saved a resumable state on a stop signal; ``str(e)`` says where and how to go on."""
