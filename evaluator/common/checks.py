"""One numeric check for the free-form settings the config cannot type (generation parameters, metric options), the
bounds of an iteration number, and the rules for names that become folders of the results tree."""
from __future__ import annotations

import os
import re
from typing import Optional


# the largest iteration the ledger (an SQLite INTEGER) holds: an entry named beyond it is no checkpoint of ours
MAX_ITERATION = 2 ** 63 - 1
# the largest seed every backend takes: transformers.set_seed seeds numpy, which refuses a seed outside 0..2^32-1
MAX_SEED = 2 ** 32 - 1


def iteration_number(digits: str) -> Optional[int]:
    """The iteration that `digits` names, or None: not ASCII digits ('²' is a digit to Python), or beyond
    MAX_ITERATION (a 20-digit name would stop every scan of its run at the ledger)."""
    if not (digits.isascii() and digits.isdigit()):
        return None
    if len(digits.lstrip("0")) > len(str(MAX_ITERATION)):  # beyond, and int() refuses over 4300 digits
        return None
    number = int(digits)
    return number if number <= MAX_ITERATION else None


def iteration_problem(value: object) -> Optional[str]:
    """What keeps `value` from being an iteration (a whole number from 0 to MAX_ITERATION), or None."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ITERATION:
        return f"expected a whole number from 0 to 2**63-1 (the largest the daemon's ledger holds), got {value!r:.40}"
    return None


def number_problem(value: object, low: Optional[float] = None, high: Optional[float] = None, integer: bool = False,
                   low_open: bool = False, numeric_strings: bool = False) -> Optional[str]:
    """What is wrong with `value` as a number in range, or None. A bool is never a number; `numeric_strings`
    accepts "30" (for settings the code reads with int()/float()), never a fraction where an integer is needed."""
    what = "an integer" if integer else "a number"
    if isinstance(value, bool) or (isinstance(value, str) and not numeric_strings):
        return f"expected {what}, got {value!r}"
    try:
        number = float(int(value) if integer and isinstance(value, str) else value)  # int("2.0") fails
    except (TypeError, ValueError):
        return f"expected {what}, got {value!r}"
    except OverflowError:  # an int beyond a float (10**400): its repr would fill the screen
        return f"expected {what} a float can hold, got an integer of {len(str(int(value)).lstrip('-'))} digits"
    if number != number or (integer and not number.is_integer()):
        return f"expected {what}, got {value!r}"
    if low is not None and (number <= low if low_open else number < low):
        return f"expected {what} {'>' if low_open else '>='} {low}, got {value!r}"
    if high is not None and number > high:
        return f"expected {what} <= {high}, got {value!r}"
    return None


def folder_name_problem(name: object) -> Optional[str]:
    """What keeps `name` from naming one folder of the results tree (a benchmark; bench.py's --name), or None:
    letters, digits, '.', '_' or '-', and not '.' or '..'."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in (".", ".."):
        return f"expected letters, digits, '.', '_' or '-' (it names a folder), got {name!r}"
    return None


def run_name_problem(name: object) -> Optional[str]:
    """What keeps `name` from naming a run's folder under results/, or None: a relative path ("team/model" nests)
    with no '..' segment, nothing empty."""
    if not isinstance(name, str) or os.path.isabs(name) or not name.strip("/") \
            or any(seg in ("", ".", "..") for seg in name.strip("/").split("/")) or "\0" in name:
        return f"expected a relative folder name without '..' (or '.') segments, got {name!r}"
    return None
