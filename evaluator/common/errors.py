"""The one exception type for problems a user can fix."""


class EvaluatorError(Exception):
    """Bad config, path or data row. The message names the key or file:line and what was expected.

    The CLI turns it into one readable line and exit code `exit_code`, never a traceback.
    """

    exit_code = 2  # the service unit does not restart on 2: fix the config first


class UnavailableError(EvaluatorError):
    """Something the config names is not there yet (a dataset on a share that is not mounted): exit 3, so a
    systemd service retries (Restart=on-failure) instead of staying down as it does for a bad config."""

    exit_code = 3
