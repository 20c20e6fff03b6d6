"""Tables, JSON files and progress bars shared by the commands.

Tables go to stdout (they are the result), progress bars to stderr (so a redirected result stays clean).
`write_json` writes atomically: a temporary file in the target folder, then `os.replace`, so a reader never
sees half a report.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxprune.io.paths import make_parent


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str | tuple[str, str]] | None = None, *,
                title: str | None = None, console=None) -> None:
    """Print dict rows as a table on stdout.

    `columns` picks and orders the keys (default: the first row's keys); an entry may be (key, header).
    Floats are shown with `format_value`; missing keys and None print as an empty cell.
    """
    from rich.table import Table

    console = console or make_console()
    columns = [(c, c) if isinstance(c, str) else c for c in (columns or (rows[0].keys() if rows else []))]
    table = Table(title=title, title_justify="left")
    for i, (_, header) in enumerate(columns):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(format_value(row.get(key)) for key, _ in columns))
    console.print(table)


def make_console(stderr: bool = False):
    """A rich Console; when output is not a terminal (a pipe, a CI log) it is 160 columns wide, not 80."""
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False, soft_wrap=False)
    if not console.is_terminal:
        console = Console(stderr=stderr, highlight=False, width=160)
    return console


def format_value(value: Any) -> str:
    """Short human text: 4 significant digits for floats, '' for None."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e9):
            return f"{value:.3e}"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    return str(value)


def to_jsonable(obj: Any) -> Any:
    """Numpy scalars and arrays, paths, tuples and sets -> plain JSON types; NaN/inf -> None (JSON has none)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write `payload` as indented JSON to `path`, atomically (temporary file beside it, then os.replace)."""
    path = Path(path)
    make_parent(path, "JSON report")
    text = json.dumps(to_jsonable(payload), indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)  # mkstemp makes the file 0600; a report gets a new file's usual permissions
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def environment() -> dict[str, Any]:
    """Machine and library versions, recorded next to every figure so results can be compared fairly."""
    import onnx

    from onnxprune import __version__

    versions = {"onnxprune": __version__, "onnx": onnx.__version__, "numpy": np.__version__,
                "python": platform.python_version()}
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:  # pragma: no cover - depends on the install
        versions["onnxruntime"] = None
    machine = {"system": platform.system(), "machine": platform.machine(), "cpu": cpu_model(),
               "cpu_count": os.cpu_count()}
    return {"machine": machine, "versions": versions}


def cpu_model() -> str:
    """The CPU's model name (as `lscpu` shows it) or the platform's processor string."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def no_progress(n: int = 1, step: str | None = None) -> None:
    """What `progress` yields when no bar is shown; timed loops compare with it to skip chunking."""


@contextlib.contextmanager
def progress(description: str, total: int | None, enabled: bool = True) -> Iterator:
    """A rich progress bar on stderr; yields `advance(n=1, step=None)` (`step` names what is being done now,
    e.g. the layer a stage refits). Disabled, advance does nothing. `total=None` shows a spinner-like bar
    with the elapsed time, for steps that cannot count.

    Also off when stderr is not a terminal: in a CI log a bar is only noise. Callers in timed loops should
    advance in strides (not per iteration) to keep the bar's cost out of the figures.
    """
    console = make_console(stderr=True) if enabled else None
    if console is None or not console.is_terminal:
        yield no_progress
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=True)
    with bar:
        task = bar.add_task(description, total=total)

        def advance(n: int = 1, step: str | None = None) -> None:
            if step is not None:
                bar.update(task, description=f"{description}: {step}")
            bar.advance(task, n)

        yield advance
