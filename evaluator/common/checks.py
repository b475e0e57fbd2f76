"""One numeric check for the free-form settings the config cannot type (generation parameters, metric options)."""
from __future__ import annotations

from typing import Optional


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
    if number != number or (integer and not number.is_integer()):
        return f"expected {what}, got {value!r}"
    if low is not None and (number <= low if low_open else number < low):
        return f"expected {what} {'>' if low_open else '>='} {low}, got {value!r}"
    if high is not None and number > high:
        return f"expected {what} <= {high}, got {value!r}"
    return None
