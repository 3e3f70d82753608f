"""Errors a user can act on.

`ccstae` prints these (and ``ValueError``/``OSError`` from bad input) as one line and exits with status 2; any other
exception is a bug or a runtime fault and keeps its traceback.
"""


class CcstaeError(RuntimeError):
    """A failure with a clear remedy: a refused resume, a corrupt checkpoint, a missing optional extra, a failed
    multi-process set-up. The message says what happened and what to do."""
