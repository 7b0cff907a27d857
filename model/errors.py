"""
What a script tells the user about bad input, kept free of torch so data-only scripts (data_process.py) start fast.

    StageError   a problem the user can fix: run_stage (model/runtime.py) prints it as one line, exit code 1
    BadLines     count, report (`file:line: reason`) and summarise unusable input lines
"""
import sys
from collections import Counter


class StageError(Exception):
    """A problem the user can fix (bad path, mismatched shapes, ...): printed as one line, exit code 1."""


class BadLines:
    """Counts unusable input lines per kind and reports the first `report_limit` as `file:line: message`.
    `total` is the number of lines read (set by the reader), for the bad ratio."""

    def __init__(self, report_limit=20):
        self.report_limit, self.kinds, self.total = report_limit, Counter(), 0

    @property
    def count(self):
        return sum(self.kinds.values())

    def add(self, path, line_no, message, kind="bad"):
        self.kinds[kind] += 1
        if self.count <= self.report_limit:
            print(f"{path}:{line_no}: {message}", file=sys.stderr)

    def summary(self) -> str:
        ratio = self.count / max(1, self.total)
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(self.kinds.items()))
        text = f"bad lines: {self.count} of {self.total} ({ratio:.2%}){': ' + kinds if kinds else ''}"
        if self.count > self.report_limit:
            text += f" (only the first {self.report_limit} were listed)"
        return text

    def verdict(self, max_bad_ratio):
        """Print the summary; False when the bad fraction is over the limit."""
        print(self.summary(), file=sys.stderr)
        ratio = self.count / max(1, self.total)
        if ratio > max_bad_ratio:
            print(f"error: {ratio:.2%} bad lines exceeds --max_bad_ratio {max_bad_ratio:.2%}; nothing was written",
                  file=sys.stderr)
            return False
        return True
