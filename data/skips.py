"""Skip accounting: bad rows never crash an epoch and are never dropped silently; they are counted by reason.

The counts are of distinct rows over a whole run, not of draws: a map-style dataset fills a skipped row's slot with
the next usable row, so bad rows and their neighbours are read many times, and every epoch reads them again; each
row is still counted once. An indexed dataset keeps one state byte per row (unseen, usable, or skipped and why); a
stream, whose rows have no index, keeps per DataLoader worker how many rows of its share were counted (each pass
brings the same share again). Both live in shared memory, so the rows DataLoader workers read reach the main
process's report, and both go into `state_dict`, so a resumed run continues the counts of its checkpoint.
"""

from __future__ import annotations

import base64
import logging
import multiprocessing
import zlib
from multiprocessing.context import get_spawning_popen
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SKIP_REASONS = (
    "unreadable_image",  # bytes or file PIL cannot decode, or a path that does not exist
    "missing_image",  # a caption or VQA row without an image
    "image_tag_count",  # LLaVA: not exactly one <image> tag with an image, or tags without one
    "bad_conversation",  # LLaVA: empty, unknown role, non-text turn, no assistant answer, tag outside a user turn
    "missing_text",  # caption, question or answer missing or empty
    "malformed_row",  # any other unexpected row shape (wrong types, missing keys)
    "placeholder_in_text",  # the text spells out an image placeholder (the processor's image token, a stray <image>)
    "too_long",  # max_length would cut into the image, or leave no answer token to train on
)
UNSEEN, USABLE, FIRST_SKIP = 0, 1, 2  # row states; FIRST_SKIP + i: skipped for SKIP_REASONS[i]
MAX_STREAM_WORKERS = 256  # slots of a stream's per-worker counts (shared memory needs a fixed size)


class SkipRow(Exception):
    """Raised by the adapters for a row that cannot become a sample; `reason` is one of `SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {SKIP_REASONS}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class SkipCounter:
    """Distinct rows read and skipped per reason, over one or more datasets, with a few example rows per reason.

    A dataset registers with `track` and reports each row it reads with `count`. The ledgers sit in locked shared
    memory, so DataLoader worker processes (fork, spawn or forkserver: they travel with the dataset when a worker
    starts) and threads add up in the main process's report. Example rows and log lines are per process: a
    worker's examples stay in that worker. Pickled outside process start (deepcopy, hashing), a counter carries a
    snapshot of its ledgers and is independent of the original from then on.
    """

    def __init__(self, max_examples: int = 3) -> None:
        self.max_examples = max_examples
        self._parts: list[tuple[bool, Any]] = []  # per dataset: (is a stream, its shared ledger)
        self._streamed = _shared(np.zeros(1 + len(SKIP_REASONS), np.int64))  # streams: rows read, skips per reason
        self._examples: dict[str, list[str]] = {}
        self._seen_here: dict[str, int] = {}  # per-process counts, to log only the first few skips

    def track(self, num_rows: int | None) -> int:
        """Start counting one dataset: an indexed one of `num_rows` rows, or a stream (None). Returns its part
        number for `count` and `known_skip`. Register before any DataLoader worker starts."""
        stream = num_rows is None
        self._parts.append((stream, _shared(np.zeros(MAX_STREAM_WORKERS if stream else num_rows, _dtype(stream)))))
        return len(self._parts) - 1

    def known_skip(self, part: int, index: int) -> bool:
        """Whether row `index` of an indexed part was skipped before (a skip depends on the row alone, so it need
        not be read again)."""
        stream, ledger = self._parts[part]
        return not stream and ledger[index] >= FIRST_SKIP

    def count(self, part: int, index: int, row_id: str, skip: SkipRow | None = None, worker: int = 0) -> None:
        """Count a row as read, and as skipped for `skip`'s reason, unless it was counted already. `index` is the
        row's index in an indexed part; in a stream, its position in the share of DataLoader worker `worker`."""
        stream, ledger = self._parts[part]
        state = USABLE if skip is None else FIRST_SKIP + SKIP_REASONS.index(skip.reason)
        with ledger.get_lock():
            if stream:
                if index < ledger[worker]:  # a share is read in order: what lies below its mark was counted
                    return
                ledger[worker] = index + 1
            else:
                if ledger[index] != UNSEEN:
                    return
                ledger[index] = state
        if stream:
            with self._streamed.get_lock():
                self._streamed[0] += 1
                if skip is not None:
                    self._streamed[state - FIRST_SKIP + 1] += 1
        if skip is not None:
            self._note(skip, row_id)

    def _note(self, skip: SkipRow, row_id: str) -> None:
        self._seen_here[skip.reason] = seen = self._seen_here.get(skip.reason, 0) + 1
        if seen <= self.max_examples:
            self._examples.setdefault(skip.reason, []).append(f"row {row_id!r}: {skip.detail}")
            logger.warning("skipping row %r (%s): %s", row_id, skip.reason, skip.detail)

    def _totals(self) -> np.ndarray:
        """Rows read, then skips per reason, over all parts."""
        totals = np.array(self._streamed[:], dtype=np.int64)
        for stream, ledger in self._parts:
            if not stream:
                states = np.bincount(_view(ledger), minlength=FIRST_SKIP + len(SKIP_REASONS))
                totals[0] += len(ledger) - states[UNSEEN]
                totals[1:] += states[FIRST_SKIP:]
        return totals

    @property
    def rows_read(self) -> int:
        return int(self._totals()[0])

    @property
    def counts(self) -> dict[str, int]:
        """Skips per reason, reasons with none left out."""
        return {reason: int(n) for reason, n in zip(SKIP_REASONS, self._totals()[1:]) if n}

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def report(self) -> str:
        """One summary line, then one line per reason with example rows (those seen in this process)."""
        read, counts = self.rows_read, self.counts
        skipped = sum(counts.values())
        if not skipped:
            return f"read {read} rows, skipped none"
        share = f"{100 * skipped / read:.1f}%" if read else "n/a"
        by_reason = ", ".join(f"{reason} {n}" for reason, n in counts.items())
        lines = [f"read {read} rows, skipped {skipped} ({share}): {by_reason}"]
        examples = [(reason, self._examples[reason]) for reason in counts if reason in self._examples]
        lines += [f"  {reason}: e.g. {'; '.join(rows)}" for reason, rows in examples]
        return "\n".join(lines)

    def summary(self) -> dict[str, Any]:
        """The report as data (what `skips.json` holds): distinct rows read and skipped, per reason, examples."""
        counts = self.counts
        examples = {reason: self._examples[reason] for reason in counts if reason in self._examples}
        return {"rows_read": self.rows_read, "skipped": sum(counts.values()), "by_reason": counts, "examples": examples}

    def state_dict(self) -> dict[str, Any]:
        """`summary` plus the ledgers, for `load_state_dict` in a resumed run (the row states are compressed:
        one byte per row, almost all alike)."""
        parts = [
            {"stream_marks": _view(ledger).tolist()} if stream else {"rows": len(ledger), "states": _pack(ledger)}
            for stream, ledger in self._parts
        ]
        return {**self.summary(), "ledger": {"parts": parts, "streamed": list(self._streamed[:])}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the counts of `state` (from `state_dict`); its datasets must be this counter's."""
        saved = [part.get("rows") for part in state["ledger"]["parts"]]
        mine = [None if stream else len(ledger) for stream, ledger in self._parts]
        if saved != mine:
            raise ValueError(
                f"the skip counts were saved for datasets of {saved} rows (None: a stream) but this run's have {mine}:"
                " they belong to another run"
            )
        for (stream, ledger), part in zip(self._parts, state["ledger"]["parts"]):
            _view(ledger)[:] = part["stream_marks"] if stream else np.frombuffer(_unpack(part["states"]), np.uint8)
        _view(self._streamed)[:] = state["ledger"]["streamed"]
        self._examples = {reason: list(rows) for reason, rows in state["examples"].items()}
        self._seen_here = {reason: len(rows) for reason, rows in self._examples.items()}

    def __repr__(self) -> str:
        return f"SkipCounter({self.report().splitlines()[0]!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if get_spawning_popen() is None:  # shared memory may only be pickled while starting a process
            state["_parts"] = [(stream, _view(ledger).copy()) for stream, ledger in self._parts]
            state["_streamed"] = _view(self._streamed).copy()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["_streamed"], np.ndarray):  # a snapshot: new shared memory with its values
            state["_parts"] = [(stream, _shared(values)) for stream, values in state["_parts"]]
            state["_streamed"] = _shared(state["_streamed"])
        self.__dict__.update(state)


def _view(array: Any) -> np.ndarray:
    """A numpy view of a shared array (no copy)."""
    return np.ctypeslib.as_array(array.get_obj())


def _dtype(stream: bool) -> type:
    return np.int64 if stream else np.uint8  # a stream's marks per worker; an indexed part's states per row


def _shared(values: np.ndarray) -> Any:
    """A locked shared-memory array holding `values` (uint8 or int64)."""
    array = multiprocessing.Array("B" if values.dtype == np.uint8 else "q", len(values))
    _view(array)[:] = values
    return array


def _pack(ledger: Any) -> str:
    return base64.b64encode(zlib.compress(_view(ledger).tobytes())).decode("ascii")


def _unpack(text: str) -> bytes:
    return zlib.decompress(base64.b64decode(text))
