"""The one base class for mistakes the user can fix (a malformed recipe, broken data paths).

`evev2` commands end on a `UserError` with one line on stderr instead of a traceback (see `evev2.cli.console_main`);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error in what the user asked for, not in evev2: its message alone says what to fix."""
