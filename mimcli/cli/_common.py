"""Shared option types, error handling and progress rendering for the commands."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mimcli.errors import Interrupted, MimcliError

stdout = Console()
stderr = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

# Help panels (typer's rich_help_panel) shared by the commands.
DATA = "Data"
MODEL = "Model"
OUTPUT = "Output"
RUNTIME = "Runtime"
TRANSFORM = "Transform"

# What a MODEL may end with, for the commands' epilogs (a paragraph of its own).
HEADS_HELP = (
    "\nAny MODEL may end in #heads=N: the attention-head count of a checkpoint that does not "
    "record it (widths outside the released ViTs'). Each load prints a note: format, "
    "architecture, where the head count came from, what was left out."
)


def number_range(
    lo: float,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> Callable[[float | None], float | None]:
    """A typer callback bounding a float option at parse time: finite (``nan``/``inf`` are
    refused) and within ``lo``..``hi`` (open ends where asked); None (an unset option that
    means 'default' or 'off') passes. A bad value is click's usage error: one line naming the
    option, exit 2."""

    def num(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else f"{x:g}"

    if hi is None:
        shown = f"{'>' if lo_open else '>='} {num(lo)}"
    else:
        shown = f"in {'(' if lo_open else '['}{num(lo)}, {num(hi)}{')' if hi_open else ']'}"

    def check(value: float | None) -> float | None:
        if value is None:
            return value
        ok = math.isfinite(value)
        if ok:
            ok = value > lo if lo_open else value >= lo
        if ok and hi is not None:
            ok = value < hi if hi_open else value <= hi
        if not ok:
            raise typer.BadParameter(f"{value:g} is not {shown}")
        return value

    return check


def count_or_auto(
    hi: int, lo: int = 1, words: tuple[str, ...] = ("auto",)
) -> Callable[[str | None], str | None]:
    """A typer callback for options taking ``auto`` (or other ``words``) or a whole number in
    ``lo``..``hi``."""

    def check(value: str | None) -> str | None:
        if value is None or value.strip().lower() in words:
            return value
        text = value.strip()
        if not (text.isascii() and text.isdigit() and lo <= int(text[:12]) <= hi):
            shown = repr(value if len(value) <= 12 else value[:9] + "...")
            raise typer.BadParameter(f"{shown} is not {' or '.join(words)} or {lo}..{hi}")
        return text

    return check


# Bounds shared by the commands (sane caps: far above any real use, far below a memory bomb).
MAX_SEED = 2**32 - 1
MAX_IMG_SIZE = 8192
MAX_HEADS_OPTION = 1024

DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device", help="auto (cuda > mps > cpu), cpu, cuda or mps.", rich_help_panel=RUNTIME
    ),
]
BatchSizeOpt = Annotated[
    int,
    typer.Option("--batch-size", min=1, help="Images per forward pass.", rich_help_panel=RUNTIME),
]
WorkersOpt = Annotated[
    str,
    typer.Option(
        "--num-workers",
        callback=count_or_auto(1024, lo=0),
        help="DataLoader worker processes; auto: this process's share of the CPU cores.",
        rich_help_panel=RUNTIME,
    ),
]
ImageColumnOpt = Annotated[
    str | None,
    typer.Option(
        "--image-column",
        help="Image column/field of a dataset or shards (default: image, img, jpg...).",
        rich_help_panel=DATA,
    ),
]
LabelColumnOpt = Annotated[
    str | None,
    typer.Option(
        "--label-column",
        help="Label column/field of a dataset or shards (default: label, labels, cls...).",
        rich_help_panel=DATA,
    ),
]
# What --data/--train/--val take, for the commands' epilogs (a paragraph of its own).
SOURCES_HELP = (
    "\nImages (--data, --train, --val): an ImageFolder (or flat) folder; hfds/OWNER/NAME[:split] "
    "(a Hub dataset, via datasets); hfids/OWNER/NAME[:split] (the same, streamed); a local "
    "parquet folder or save_to_disk dataset (PATH[:split]); wds/PATTERN (WebDataset tar shards, "
    "a brace pattern of paths or http(s) URLs; indexed once, cached). Extras: mimcli[hf], "
    "mimcli[wds]."
)
BackendOpt = Annotated[
    str,
    typer.Option(
        "--knn-backend",
        help="Nearest-neighbour search: auto, faiss or torch.",
        rich_help_panel=RUNTIME,
    ),
]
BadImageOpt = Annotated[
    str,
    typer.Option(
        "--on-bad-image",
        help="Unreadable image files: skip (and report) or fail.",
        rich_help_panel=DATA,
    ),
]
ImgSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--img-size",
        min=8,
        max=MAX_IMG_SIZE,
        help="Override the model's eval input size (pixels).",
        rich_help_panel=TRANSFORM,
    ),
]
CropPctOpt = Annotated[
    float | None,
    typer.Option(
        "--crop-pct",
        callback=number_range(0, 1, lo_open=True),
        help="Override the centre-crop fraction, e.g. 0.875.",
        rich_help_panel=TRANSFORM,
    ),
]
MeanOpt = Annotated[
    str | None,
    typer.Option("--mean", help="Override normalisation mean: r,g,b.", rich_help_panel=TRANSFORM),
]
StdOpt = Annotated[
    str | None,
    typer.Option("--std", help="Override normalisation std: r,g,b.", rich_help_panel=TRANSFORM),
]
InterpolationOpt = Annotated[
    str | None,
    typer.Option(
        "--interpolation",
        help="Override resize: bilinear, bicubic or nearest.",
        rich_help_panel=TRANSFORM,
    ),
]
NumHeadsOpt = Annotated[
    int | None,
    typer.Option(
        "--num-heads",
        min=1,
        max=MAX_HEADS_OPTION,
        help="Attention heads of MODEL if its file has no count (= MODEL#heads=N).",
        rich_help_panel=MODEL,
    ),
]
TrackerOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--tracker",
        help="Also log to tensorboard, wandb, mlflow or trackio (repeatable; offline by default; "
        "extras mimcli[NAME]).",
        rich_help_panel=OUTPUT,
        show_default=False,
    ),
]
ForceUnlockOpt = Annotated[
    bool,
    typer.Option(
        "--force-unlock",
        help="Take the run folder's lock from a run that is gone.",
        rich_help_panel=OUTPUT,
    ),
]
JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Print the result as JSON on stdout.", rich_help_panel=OUTPUT),
]


def transform_overrides(
    img_size: int | None,
    crop_pct: float | None,
    mean: str | None,
    std: str | None,
    interpolation: str | None,
) -> dict[str, Any]:
    """Evaluation-transform overrides in timm's pretrained_cfg terms."""
    out: dict[str, Any] = {}
    if img_size is not None:
        out["input_size"] = (3, img_size, img_size)
    if crop_pct is not None:
        if not 0 < crop_pct <= 1:
            raise MimcliError(f"--crop-pct must be in (0, 1], got {crop_pct}")
        out["crop_pct"] = crop_pct
    for name, text in (("mean", mean), ("std", std)):
        if text is None:
            continue
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError as exc:
            raise MimcliError(f"--{name} {text!r}: expected 3 numbers like 0.5,0.5,0.5") from exc
        if len(values) == 1:
            values = values * 3
        if len(values) != 3:
            raise MimcliError(f"--{name} {text!r}: expected 1 or 3 numbers")
        out[name] = values
    if interpolation is not None:
        if interpolation not in ("bilinear", "bicubic", "nearest"):
            raise MimcliError("--interpolation must be bilinear, bicubic or nearest")
        out["interpolation"] = interpolation
    return out


_default_showwarning = warnings.showwarning


def _show_warning(message: Any, category: Any, filename: str, lineno: int, *rest: Any) -> None:
    """mimcli's own warnings as one ``warning:`` line; others as Python prints them."""
    if "mimcli" in str(filename):
        stderr.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)
    else:
        _default_showwarning(message, category, filename, lineno, *rest)


_pending_notes: list[str] = []


class _NoteCollector(logging.Handler):
    """Holds the library's load notes (logger ``mimcli``, INFO) until :func:`show_notes`."""

    def emit(self, record: logging.LogRecord) -> None:
        _pending_notes.append(record.getMessage())


def show_notes() -> None:
    """Print the load notes held so far as ``note:`` lines on stderr (rank 0 only under
    torchrun). Called when work starts (the first progress update, refine's banner) and when a
    command ends, so a command that fails before any work prints only its error line."""
    quiet = os.environ.get("RANK", "0") not in ("", "0")
    while _pending_notes:
        line = _pending_notes.pop(0)
        if not quiet:
            stderr.print(f"note: {line}", markup=False, highlight=False, soft_wrap=True)


@contextmanager
def collecting_notes() -> Iterator[None]:
    logger = logging.getLogger("mimcli")
    handler, level = _NoteCollector(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    _pending_notes.clear()
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        _pending_notes.clear()


def error_text(err: BaseException) -> str:
    """The message of ``err``; one raised in a DataLoader worker comes back from torch as
    "Caught ... in DataLoader worker process N" plus the worker's traceback: keep the original
    message (the traceback's last line) only."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    name = type(err).__name__
    return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last


def handle_errors(func: F) -> F:
    """User mistakes and remote failures become one line on stderr and an exit code, no trace."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings(), collecting_notes():
                warnings.showwarning = _show_warning
                result = func(*args, **kwargs)
                show_notes()
                return result
        except Interrupted as err:  # refine: what was saved and how to go on
            stderr.print(str(err), markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(err.exit_code) from None
        except MimcliError as err:
            text = escape(error_text(err))
            stderr.print(f"[bold red]error:[/] {text}", highlight=False, soft_wrap=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            stderr.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


class ImageProgress:
    """A rich progress bar per stage with images/s (and the loss, for training), on stderr.

    It starts with the first update, so a command that fails before any work prints nothing but
    its error line. Called as ``progress(stage, done, total)`` by feature extraction (the rate is
    measured here) or ``progress(stage, done, total, {"loss": .., "img/s": ..})`` by training.
    """

    def __init__(self, show_loss: bool = False) -> None:
        columns = [TextColumn("{task.description:>6}"), BarColumn(), MofNCompleteColumn()]
        if show_loss:
            columns.append(TextColumn("loss {task.fields[loss]}"))
        columns += [
            TextColumn("{task.fields[rate]:>8} img/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        ]
        # the ETA from the last hour's steps (rich's 30 s default blanks it when a step is slower)
        self.progress = Progress(
            *columns, console=stderr, transient=False, speed_estimate_period=3600
        )
        self.tasks: dict[str, Any] = {}
        self.started: dict[str, float] = {}
        self.estimated: set[str] = set()
        self.live = False

    def __call__(
        self, stage: str, done: int, total: int, metrics: dict[str, float] | None = None
    ) -> None:
        if _pending_notes:
            show_notes()
        if not self.live:
            self.progress.start()
            self.live = True
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total, rate="-", loss="-")
            self.started[stage] = time.perf_counter()
            if done and done == total and metrics is None:  # done at once: from a cache
                self.progress.update(self.tasks[stage], completed=done, rate="cached")
                return
        fields: dict[str, str] = {}
        if metrics is not None:
            fields["rate"] = f"{metrics.get('img/s', 0.0):,.0f}"
            fields["loss"] = f"{metrics.get('loss', float('nan')):.3f}"
            self.estimate(stage, done, total)
        else:
            elapsed = time.perf_counter() - self.started[stage]
            fields["rate"] = f"{done / elapsed:,.0f}" if done and elapsed > 0 else "-"
        self.progress.update(self.tasks[stage], completed=done, **fields)

    def estimate(self, stage: str, done: int, total: int) -> None:
        """Once per training stage, after its first steps (3, or 60 s): the stage's estimated
        wall time, and what cuts it when that is hours."""
        elapsed = time.perf_counter() - self.started[stage]
        if stage in self.estimated or done >= total or (done < 3 and elapsed < 60) or not done:
            return
        self.estimated.add(stage)
        left = elapsed / done * (total - done)
        line = (
            f"{stage}: about {_duration(elapsed + left)} for {total} steps ({_duration(left)} left)"
        )
        if left > 2 * 3600:
            line += "; fewer --local-crops or --steps (or a GPU) cut it"
        self.progress.console.print(line, highlight=False)

    @contextmanager
    def running(self) -> Iterator[ImageProgress]:
        try:
            yield self
        finally:
            if self.live:
                self.progress.stop()
                self.live = False


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()
