"""The audit's resume journal: each finished part's per-example verdicts on disk, so a killed audit resumes.

One file per finished part (a block of a verifier, a chunk of an attack, a swept eps, smoothing):
``<folder>/audit-<key>-<part>.npz``, its per-example arrays and its figures as JSON (``__meta__``), written to a
temporary file, flushed and renamed, so an entry is whole or absent whenever the process dies. ``key`` hashes
everything a verdict depends on (:func:`journal_key`), the code included: entries of another model, data set,
params, machine set-up or version of the audit's code are never read. A folder that holds another key's entries
is cleared of another code's entries when a journal opens on it, with one line saying why (:meth:`Journal.open`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipeline.reporting import atomic_write_bytes
from pipeline.runtime import default_device

JOURNAL_FORMAT = 4
"""Bump when what a journal entry holds changes (the code's own changes are in the key: :func:`code_fingerprint`)."""

Entry = tuple[dict[str, np.ndarray], dict]
"""A part's per-example arrays and its JSON figures."""


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of the library's sources (every ``pipeline/**/*.py``, path and bytes): a journal written by other
    code (a verdict rule changed since) never matches."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def savez_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(Path(path), buf.getvalue())


def journal_key(model_path: Path, x: np.ndarray, y: np.ndarray, settings: dict) -> tuple[str, str]:
    """``(key, inputs)``: the hash of what every verdict depends on, and of the inputs alone (the model file's
    bytes, the data, ``settings``: every audit param, the layout of its parts, whether bounds are kept), so a
    mismatch can say whether the code or the inputs changed. The key adds the numerics (device, torch's thread
    count, library versions: another float summation order can flip a borderline verdict) and
    :func:`code_fingerprint`. A model's external data files are not hashed: replace them, and discard the journal.
    """
    import onnxruntime

    h = hashlib.sha256()
    with open(model_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    for a in (x, y):
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).data)
    h.update(json.dumps(settings, sort_keys=True).encode())
    inputs = h.hexdigest()[:16]
    numerics = {"format": JOURNAL_FORMAT, "device": str(default_device()), "threads": torch.get_num_threads(),
                "versions": [np.__version__, torch.__version__, onnxruntime.__version__], "code": code_fingerprint()}
    key = hashlib.sha256((inputs + json.dumps(numerics, sort_keys=True)).encode()).hexdigest()[:16]
    return key, inputs


class Journal:
    """The finished parts in ``folder`` under ``key`` (nothing kept without a folder)."""

    def __init__(self, folder: Path | None, key: str = "") -> None:
        self.folder, self.key = (Path(folder) if folder is not None else None), key

    @classmethod
    def open(cls, folder: Path, key: str, inputs: str, say: Callable[[str], None]) -> Journal:
        """The journal in ``folder`` under ``key``. Each key's manifest (``audit-<key>.json``) names its inputs and
        code: entries of the same inputs written by other code can never be used again and are removed; entries
        of other inputs are ignored and left (they may be another audit's). ``say`` tells either in one line."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        code = code_fingerprint()
        for manifest in folder.glob("audit-*.json"):
            other = manifest.name[len("audit-"):-len(".json")]
            if other == key:
                continue
            try:
                old = json.loads(manifest.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(old, dict) and old.get("inputs") == inputs and old.get("code") != code:
                entries = list(folder.glob(f"audit-{other}-*.npz"))
                for entry in [*entries, manifest]:
                    with contextlib.suppress(OSError):
                        entry.unlink()
                if entries:
                    say(f"audit journal {folder}: {len(entries)} entries discarded: written by other code (the "
                        f"pipeline's sources changed since), so their verdicts may be stale")
        others = [e for e in folder.glob("audit-*.npz") if not e.name.startswith(f"audit-{key}-")]
        if others:
            say(f"audit journal {folder}: {len(others)} entries of another model, data set, params, machine set-up "
                f"or code ignored")
        atomic_write_bytes(folder / f"audit-{key}.json", json.dumps({"inputs": inputs, "code": code}).encode())
        return cls(folder, key)

    def _path(self, part: str) -> Path:
        return self.folder / f"audit-{self.key}-{part}.npz"

    def get(self, part: str, shapes: dict[str, tuple[int, ...]], keys: tuple[str, ...]) -> Entry | None:
        """The entry of ``part`` if it is whole and holds the arrays (of these shapes) and figures expected."""
        if self.folder is None:
            return None
        try:
            with np.load(self._path(part), allow_pickle=False) as f:  # zip CRCs catch flipped bits
                arrays = {k: f[k] for k in f.files}
            meta = json.loads(str(arrays.pop("__meta__")))
        except Exception:  # missing, or damaged (disk fault, a hand edit): recomputed, never trusted or fatal
            return None
        if not isinstance(meta, dict) or any(k not in meta for k in keys) or \
                any(k not in arrays or arrays[k].shape != shape for k, shape in shapes.items()):
            return None
        return arrays, meta

    def run(self, part: str, compute: Callable[[], Entry], shapes: dict[str, tuple[int, ...]],
            keys: tuple[str, ...] = ("seconds",)) -> Entry:
        """The part's entry from the journal, else from ``compute()``, then journaled."""
        got = self.get(part, shapes, keys)
        if got is None:
            got = compute()
            self.put(part, *got)
        return got

    def put(self, part: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Journal the entry of ``part`` (whole or not at all)."""
        if self.folder is not None:
            savez_atomic(self._path(part), {**arrays, "__meta__": np.array(json.dumps(meta))})


def discard_journal(folder: Path) -> None:
    """Remove the audit journal entries in ``folder`` (of any key, temporary files of killed writers, the manifest),
    then the folder once empty. Call it when the report is safely written: the journal has served its purpose."""
    folder = Path(folder)
    for pattern in ("audit-*.npz", "audit-*.json", ".audit-*.*.tmp"):
        for entry in folder.glob(pattern):
            with contextlib.suppress(OSError):
                entry.unlink()
    with contextlib.suppress(OSError):  # not empty: someone else's files, left alone
        folder.rmdir()
