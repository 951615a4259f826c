"""One exception type for problems a user can fix.

The CLI catches `DiffalignError` and prints its message on one line (exit status 2); every
message names the problem *and* the fix, e.g.
"dataset 'x.parquet' has no column 'jpg_1': the Pick-a-Pic schema needs caption, jpg_0, ...".
Anything else is a bug and keeps its traceback.
"""


class DiffalignError(Exception):
    """A user-facing error: bad input, bad config, missing weights, unsupported model."""
