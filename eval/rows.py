"""Evaluation items from data rows: a row that cannot be one (no question, answer or reference, no readable image) is
skipped and counted by reason (the training adapters' reasons), so a score always says how many rows it left out."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ..data.adapters import as_text, row_id
from ..data.skips import SkipRow

Item = TypeVar("Item")


@dataclass
class ReadItems(Generic[Item]):
    """The items read from rows, in row order, and the rows skipped (row index, id, reason, detail)."""

    items: list[Item] = field(default_factory=list)
    skipped_rows: list[dict[str, Any]] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        """What a results file records: counts per reason and every skipped row."""
        return {"counts": dict(Counter(row["reason"] for row in self.skipped_rows)), "rows": self.skipped_rows}


def read_items(rows: Iterable[Mapping[str, Any]], read: Callable[[Mapping[str, Any], int], Item]) -> ReadItems[Item]:
    """`read(row, index)` for every row; a row it rejects with :class:`SkipRow` is recorded instead of raised."""
    result: ReadItems[Item] = ReadItems()
    for index, row in enumerate(rows):
        try:
            result.items.append(read(row, index))
        except SkipRow as skip:
            result.skipped_rows.append(
                {"row": index, "id": row_id(row, index), "reason": skip.reason, "detail": skip.detail}
            )
    return result


def text_cell(row: Mapping[str, Any], column: str) -> str:
    """The stripped text of a cell (a number spelled out), or :class:`SkipRow` ("missing_text") when it has none."""
    text = as_text(row.get(column))
    if text is None or not text.strip():
        raise SkipRow("missing_text", f"no {column}: {row.get(column)!r}")
    return text.strip()
