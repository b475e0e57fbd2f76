"""The one exception type for problems a user can fix."""
import difflib


class EvaluatorError(Exception):
    """Bad config, path or data row. The message names the key or file:line and what was expected.

    The CLI turns it into one readable line and exit code `exit_code`, never a traceback.
    """

    exit_code = 2  # the service unit does not restart on 2: fix the config first


class UnavailableError(EvaluatorError):
    """Something the config names is not there yet (a dataset on a share that is not mounted): exit 3, so a
    systemd service retries (Restart=on-failure) instead of staying down as it does for a bad config."""

    exit_code = 3


def did_you_mean(name: object, known, cutoff: float = 0.6) -> str:
    """The tail of a message about an unknown key or name: `; did you mean 'x'?` naming the closest known
    name, or "" when none is close."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=cutoff)
    return f"; did you mean '{close[0]}'?" if close else ""
