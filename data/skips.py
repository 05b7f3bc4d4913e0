"""Skip accounting: bad rows never crash an epoch and are never dropped silently; they are counted by reason."""

from __future__ import annotations

import logging
import multiprocessing
from multiprocessing.context import get_spawning_popen
from typing import Any

logger = logging.getLogger(__name__)

# One slot per reason: the counts live in shared memory, which needs a fixed layout.
SKIP_REASONS = (
    "unreadable_image",  # bytes or file PIL cannot decode, or a path that does not exist
    "missing_image",  # a caption or VQA row without an image
    "image_tag_count",  # LLaVA: not exactly one <image> tag with an image, or tags without one
    "bad_conversation",  # LLaVA: empty, unknown role, non-text turn, no assistant answer, tag outside a user turn
    "missing_text",  # caption, question or answer missing or empty
    "malformed_row",  # any other unexpected row shape (wrong types, missing keys)
)


class SkipRow(Exception):
    """Raised by the adapters for a row that cannot become a sample; `reason` is one of `SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {SKIP_REASONS}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class SkipCounter:
    """Rows read and rows skipped per reason, with a few example rows per reason for the report.

    The counts sit in a locked shared-memory array, so skips in DataLoader worker processes (fork, spawn or
    forkserver: the array travels with the dataset when a worker starts) and in threads add up in the main
    process's report. Example rows and log lines are per process: a worker's examples stay in that worker.
    Pickled outside process start (deepcopy, hashing), a counter carries a snapshot of its counts and is
    independent of the original from then on.
    """

    def __init__(self, max_examples: int = 3) -> None:
        self.max_examples = max_examples
        self._counts = multiprocessing.Array("q", 1 + len(SKIP_REASONS))  # slot 0: rows read
        self._examples: dict[str, list[str]] = {}
        self._seen_here: dict[str, int] = {}  # per-process counts, to log only the first few skips

    def record_row(self) -> None:
        with self._counts.get_lock():
            self._counts[0] += 1

    def skip(self, reason: str, row_id: str, detail: str) -> None:
        slot = 1 + SKIP_REASONS.index(reason)
        with self._counts.get_lock():
            self._counts[slot] += 1
            self._seen_here[reason] = seen = self._seen_here.get(reason, 0) + 1
            if seen <= self.max_examples:
                self._examples.setdefault(reason, []).append(f"row {row_id!r}: {detail}")
        if seen <= self.max_examples:
            logger.warning("skipping row %r (%s): %s", row_id, reason, detail)

    @property
    def rows_read(self) -> int:
        return self._counts[0]

    @property
    def counts(self) -> dict[str, int]:
        """Skips per reason, reasons with none left out."""
        values = self._counts[1:]
        return {reason: n for reason, n in zip(SKIP_REASONS, values) if n}

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def report(self) -> str:
        """One summary line, then one line per reason with example rows (those seen in this process)."""
        read, skipped = self.rows_read, self.skipped
        if not skipped:
            return f"read {read} rows, skipped none"
        share = f"{100 * skipped / read:.1f}%" if read else "n/a"
        by_reason = ", ".join(f"{reason} {n}" for reason, n in self.counts.items())
        lines = [f"read {read} rows, skipped {skipped} ({share}): {by_reason}"]
        examples = [(reason, self._examples[reason]) for reason in self.counts if reason in self._examples]
        lines += [f"  {reason}: e.g. {'; '.join(rows)}" for reason, rows in examples]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SkipCounter({self.report().splitlines()[0]!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if get_spawning_popen() is None:  # shared memory may only be pickled while starting a process
            state["_counts"] = list(self._counts[:])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["_counts"], list):
            snapshot = state["_counts"]
            state["_counts"] = multiprocessing.Array("q", len(snapshot))
            state["_counts"][:] = snapshot
        self.__dict__.update(state)
