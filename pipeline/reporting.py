"""Rich progress and tables for people; atomically written JSON / CSV for machines (DVC metrics and plots)."""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from pipeline.errors import HydraPipeError

console = Console(stderr=True)


def progress_bar() -> Progress:
    """A rich progress bar on stderr (stdout stays free for results)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=False,
                    disable=os.environ.get("HYDRA_PIPE_QUIET") == "1")


def _sweep_orphans(path: Path) -> None:
    """Remove temporary files of ``path`` left by writers that died mid-write (SIGKILL, power loss): their pid,
    in the temp name, is no longer running. A live writer's temp file is left alone."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].partition(".")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        except OSError:  # alive but another user's (EPERM): not ours to remove
            pass


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename: readers see the old file or
    the new one, never a partial file, whenever the writer dies. A failure (disk full, read-only folder) is one
    line naming the file and the OS's reason, and removes the temporary file."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep_orphans(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            # without fsync a full disk may only show at writeback, after the rename made the file look complete
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary shared files
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)
        raise HydraPipeError(f"{path}: cannot write ({e.strerror or e})") from None
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: str | None) -> None:
    if tmp is not None:
        with contextlib.suppress(OSError):
            Path(tmp).unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n").encode())


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_csv(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    rows = list(rows)
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def metrics_table(title: str, metrics: Mapping[str, Any]) -> Table:
    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in metrics.items():
        if isinstance(v, (dict, list)):
            continue
        t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    return t


def layer_labels(kinds: Mapping[str, str]) -> dict[str, str]:
    """Names people can read for a network's weight layers: ``kinds`` maps each layer's module name, in network
    order, to its kind (``conv``, ``fc``). A name that is only a position (an ``nn.Sequential`` index such as ``1``
    or ``features.3``) becomes its kind and rank among the layers of that kind (conv1, conv2, fc1, ...); a name
    with words (ResNet's ``layer1.0.conv1``) is kept as it is."""
    rank: Counter[str] = Counter()
    labels: dict[str, str] = {}
    for name, kind in kinds.items():
        rank[kind] += 1
        label = f"{kind}{rank[kind]}" if name.rpartition(".")[2].isdigit() else name
        labels[name] = f"{label} ({name})" if label != name and label in kinds else label
    return labels


def show(table: Table) -> None:
    Console().print(table)
