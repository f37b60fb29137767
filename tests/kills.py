"""A process killed mid-run, for the resume tests: :class:`Killed` raised at a chosen call of a step function."""
import itertools
from typing import Callable, Optional


class Killed(Exception):
    """Stands in for the process being killed mid-run."""


def killed_at(call: Optional[int], function: Callable) -> Callable:
    """``function`` that raises :class:`Killed` at its ``call``-th call instead (never when ``call`` is None)."""
    calls = itertools.count(1)

    def function_or_killed(*args, **kwargs):
        if next(calls) == call:
            raise Killed
        return function(*args, **kwargs)

    return function_or_killed
