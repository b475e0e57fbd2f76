"""The one exception type for problems a user can fix."""


class EvaluatorError(Exception):
    """Bad config, path or data row. The message names the key or file:line and what was expected.

    The CLI turns it into one readable line and exit code 2, never a traceback.
    """
