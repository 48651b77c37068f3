"""The two kinds of failure every tool reports in one line (megatron_cmbert/cli.py turns them into exit codes).

    UserError    something the user gave is wrong: a flag, a file, a line of data     -> exit status 2
    ToolFailure  the work itself failed in a known way (a non-finite loss, a check)   -> exit status 1

Every typed library error derives from one of them (DataConfigError(UserError, ValueError), ...), so a
tool needs no list of exception types: anything else is a bug and keeps its traceback (exit status 1).
This module imports nothing, so any layer may use it.
"""


class UserError(Exception):
    """A mistake in the input; the message is one line naming the flag or file (and line) and what is wrong."""


class ToolFailure(Exception):
    """A known failure that is not the user's mistake; the message is one line saying what failed."""
