"""The errors a user causes, which `moa` reports as one line (exit 2) instead of a traceback.

`UsageError` is raised by moa code for a mistake in what the user gave or in the environment
they run in: a bad value, a missing, corrupt or misplaced file, an output that would overwrite
something, a device that is not there. It subclasses ValueError so that callers checking values
catch it as one. Library exceptions about a user's file are converted into it where they are raised
(e.g. safetensors' errors in moa.saved_run). Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations


class UsageError(ValueError):
    """A mistake in the user's input or environment; the message names the value and what was expected."""


# files the user names that are missing, in the way or unreadable
USER_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
