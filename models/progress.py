"""A rich progress bar for training, usable as :data:`models.train.Progress`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from models.train import Progress as ProgressFn


@contextmanager
def training_bar(label: str, console: Console | None = None) -> Iterator[ProgressFn]:
    """Yield a callback ``(description, done, total)`` that drives one progress bar."""
    console = console or Console(stderr=True)
    with Progress(
        TextColumn(f"[bold]{label}[/bold]"),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task("", total=None)

        def update(description: str, done: int, total: int) -> None:
            bar.update(task, description=description, completed=done, total=total)

        yield update
