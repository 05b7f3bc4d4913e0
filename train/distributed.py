"""Which process does the once-per-run work (saving, cards, pushes): the Trainer's own view, through accelerate."""

from __future__ import annotations

from accelerate import PartialState


def is_main_process() -> bool:
    """True in the one process that writes shared files (always, without torchrun / accelerate launch)."""
    return PartialState().is_main_process


def wait_for_everyone() -> None:
    """A barrier across processes (a no-op in a single one): e.g. before every process loads what the main wrote."""
    PartialState().wait_for_everyone()
