"""The results file of a batch: an append-only JSON-lines record that a rerun resumes from.

The first line is a header naming the batch's problems by content id; every other line is one
finished task's row, written and synced at once. Only one process writes the file, under an
exclusive lock. A torn last line (the writer was killed mid-line) is dropped on reopening; a file
written for another set of problems, or one that is not a results file, is refused and left
untouched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS_FORMAT = "osscar_opt.batch"
RESULTS_VERSION = 1


class ResultsFile:
    """The append-only JSON-lines record of a batch (see the module docstring); ``problems`` are
    the batch's ``(content id, name)`` pairs.

    The first line is ``{"format": "osscar_opt.batch", "version": 1, "problems": [[id, name], ...]}``;
    every other line is one finished task's row with its ``key``. A torn last line (the writer was
    killed mid-line) is dropped; a damaged line before it is an error naming the line.
    """

    def __init__(self, path: str | os.PathLike, problems: Sequence[tuple[str, str]]) -> None:
        self.path = Path(path)
        self.problems = [[problem_id, name] for problem_id, name in problems]
        self._handle = None

    def open(self) -> dict[str, dict[str, Any]]:
        """Lock the file (creating it with its header when new) and return the rows it holds by key."""
        import fcntl

        if self.path.is_dir():
            raise ValueError(f"results: {self.path} is a folder, expected a file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+b")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise ValueError(f"results: {self.path} is in use by another running batch") from None
        try:
            handle.seek(0)
            rows = self._read(handle)
        except BaseException:
            handle.close()
            raise
        self._handle = handle
        return rows

    def _read(self, handle) -> dict[str, dict[str, Any]]:
        data = handle.read()
        if not data:
            handle.write((json.dumps({"format": RESULTS_FORMAT, "version": RESULTS_VERSION,
                                      "problems": self.problems}) + "\n").encode())
            self._sync(handle)
            return {}
        lines = data.split(b"\n")
        complete = len(lines) - 1  # the text after the last newline is torn (or empty)
        header = _json_line(lines[0]) if complete else None
        if not isinstance(header, dict) or header.get("format") != RESULTS_FORMAT:
            raise ValueError(f"results: {self.path} exists and is not an osscar_opt batch results file; "
                             "give another path (it is left untouched)")
        if header.get("version") != RESULTS_VERSION:
            raise ValueError(f"results: {self.path} has batch format version {header.get('version')!r}, "
                             f"this osscar_opt writes version {RESULTS_VERSION}")
        theirs = {str(pid): name for pid, name in header.get("problems", [])}
        ours = dict(self.problems)
        if set(theirs) != set(ours):
            missing = sorted(ours[pid] for pid in set(ours) - set(theirs))[:3]
            extra = sorted(theirs[pid] for pid in set(theirs) - set(ours))[:3]
            raise ValueError(
                f"results: {self.path} holds the results of another batch ({len(theirs)} problems; this batch has "
                f"{len(ours)}; not in the file: {missing or 'none'}; only in the file: {extra or 'none'}); give "
                "another --results file or remove this one"
            )
        rows: dict[str, dict[str, Any]] = {}
        for number, line in enumerate(lines[1:complete], start=2):
            row = _json_line(line)
            if not isinstance(row, dict) or "key" not in row:
                raise ValueError(f"results: {self.path} line {number} is damaged (not a batch row)")
            rows[row["key"]] = row  # a later row of a task (a retried error) replaces the earlier one
        if lines[-1]:  # a torn last line: cut it off before appending
            handle.truncate(len(data) - len(lines[-1]))
        return rows

    @staticmethod
    def _sync(handle) -> None:
        handle.flush()
        os.fsync(handle.fileno())

    def append(self, row: dict[str, Any]) -> None:
        assert self._handle is not None, "open() first"
        self._handle.write((json.dumps(row, allow_nan=False) + "\n").encode())
        self._sync(self._handle)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _json_line(line: bytes) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None
