"""Shared option types, error handling and progress rendering for the commands."""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mimcli.errors import MimcliError

stdout = Console()
stderr = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto (cuda > mps > cpu), cpu, cuda or mps.")
]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")]
WorkersOpt = Annotated[
    int, typer.Option("--num-workers", min=0, help="DataLoader worker processes.")
]
BackendOpt = Annotated[
    str, typer.Option("--knn-backend", help="Nearest-neighbour search: auto, faiss or torch.")
]
BadImageOpt = Annotated[
    str, typer.Option("--on-bad-image", help="Unreadable image files: skip (and report) or fail.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]


def parse_blocks(text: str | None) -> list[int] | None:
    """``"1,4,8-12"`` -> [1, 4, 8, 9, 10, 11, 12] (1-based block numbers)."""
    if text is None or text.strip() in ("", "all"):
        return None
    blocks: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                blocks.update(range(lo, hi + 1))
            else:
                blocks.add(int(part))
    except ValueError as exc:
        raise MimcliError(
            f"--blocks {text!r}: expected block numbers like 9,10,12 or 17-24 (counted from 1)"
        ) from exc
    return sorted(blocks)


def handle_errors(func: F) -> F:
    """User mistakes and remote failures become one line on stderr and an exit code, no trace."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MimcliError as err:
            stderr.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            stderr.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


class ImageProgress:
    """A rich progress bar per stage with images/s, on stderr; hidden when not a terminal."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description:>6}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>8} img/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=stderr,
            transient=False,
        )
        self.tasks: dict[str, Any] = {}
        self.started: dict[str, float] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total, rate="-")
            self.started[stage] = time.perf_counter()
        elapsed = max(time.perf_counter() - self.started[stage], 1e-9)
        self.progress.update(self.tasks[stage], completed=done, rate=f"{done / elapsed:,.0f}")

    @contextmanager
    def running(self) -> Iterator[ImageProgress]:
        with self.progress:
            yield self


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()
