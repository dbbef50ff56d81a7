"""Checkpoints: safetensors (never pickle) plus a JSON sidecar, both written atomically.

A checkpoint stores the *folded* dense weights (``weight * mask``: zeros exactly where pruned), so standard
``Conv2d`` / ``Linear`` layers load it, and the masks under ``mask/<layer>`` so finetuning keeps them frozen.
The sidecar records the architecture, the dataset facts needed to rebuild the model, the params hash, the parent
checkpoint, the sparsity and the SHA-256 of the safetensors bytes: the two files are renamed into place one after
the other, so a writer killed between the renames (or a hand-copied pair) leaves weights that the sidecar does not
describe, and the hash is how a reader notices. Sidecars written before the hash have none and still load.

Training's resume states (:func:`write_state`, :func:`read_state`) are one safetensors file each, their JSON in the
file's own header, so one rename replaces all of a state at once.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from pipeline.data import DatasetInfo
from pipeline.errors import HydraPipeError
from pipeline.masking import fold_masks, global_sparsity, is_masking_state, masked_layers
from pipeline.models import build_model
from pipeline.reporting import atomic_write_bytes, write_json

MASK_PREFIX = "mask/"


def sidecar_path(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def save_checkpoint(model: nn.Module, path: Path, arch: str, info: DatasetInfo, params_hash: str,
                    parent: str | None = None, extra: dict[str, Any] | None = None) -> None:
    """Fold masks into the weights and write ``path`` (safetensors) and its ``.json`` sidecar."""
    fold_masks(model)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not is_masking_state(k)}
    for name, layer in masked_layers(model):
        if layer.mode != "dense":
            tensors[MASK_PREFIX + name] = layer.mask().detach().to(torch.uint8).cpu().contiguous()
    meta = {"arch": arch, "dataset": asdict(info), "params_hash": params_hash, "parent": parent,
            "sparsity": global_sparsity(model), **(extra or {})}
    blob = st_save(tensors, metadata={"arch": arch})
    meta["sha256"] = hashlib.sha256(blob).hexdigest()
    atomic_write_bytes(Path(path), blob)
    write_json(sidecar_path(path), meta)


def read_sidecar(path: Path) -> dict[str, Any]:
    side = sidecar_path(path)
    try:
        meta = json.loads(side.read_text())
    except FileNotFoundError:
        if not Path(path).exists():
            raise HydraPipeError(f"{path}: checkpoint not found") from None
        raise HydraPipeError(f"{side} not found: the JSON that describes the checkpoint {path} (written beside it "
                             "by the stage that made it; run that stage again)") from None
    except json.JSONDecodeError as e:
        raise HydraPipeError(f"{side}: not valid JSON ({e.msg}, line {e.lineno})") from None
    for key in ("arch", "dataset"):
        if key not in meta:
            raise HydraPipeError(f"{side}: missing field {key!r}")
    return meta


def load_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from the sidecar and load the tensors; masked layers come back with frozen masks."""
    path = Path(path)
    meta = read_sidecar(path)
    try:
        info = DatasetInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["dataset"].items()})
    except TypeError as e:
        raise HydraPipeError(f"{sidecar_path(path)}: field 'dataset' is malformed ({e})") from None
    model = build_model(meta["arch"], info)
    blob = _read_bytes(path, "checkpoint")
    tensors = _parse(blob, path, "checkpoint")
    recorded = meta.get("sha256")  # absent in sidecars written before it: accepted
    if recorded is not None and recorded != (actual := hashlib.sha256(blob).hexdigest()):
        raise HydraPipeError(f"{path}: does not match its sidecar {sidecar_path(path)} (SHA-256 {actual[:12]}..., "
                             f"the sidecar records {str(recorded)[:12]}...); were they written by different runs?")
    masks = {k[len(MASK_PREFIX):]: v for k, v in tensors.items() if k.startswith(MASK_PREFIX)}
    state = {k: v for k, v in tensors.items() if not k.startswith(MASK_PREFIX)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise HydraPipeError(f"{path}: tensors do not match architecture {meta['arch']!r} ({first})") from None
    missing = [k for k in missing if not is_masking_state(k)]
    if missing or unexpected:
        raise HydraPipeError(f"{path}: tensors do not match architecture {meta['arch']!r} "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    layers = dict(masked_layers(model))
    for name, m in masks.items():
        if name not in layers or m.shape != layers[name].weight.shape:
            raise HydraPipeError(f"{path}: mask {name!r} does not match a layer of {meta['arch']!r}")
        layers[name].fix_mask(m.to(layers[name].weight_mask.dtype))
    return model, meta


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise HydraPipeError(f"{path}: {what} not found") from None
    except OSError as e:
        raise HydraPipeError(f"{path}: cannot read the {what} ({e.strerror or e})") from None


def _parse(blob: bytes, path: Path, what: str) -> dict[str, torch.Tensor]:
    """safetensors only: its parser reads a JSON header and raw tensor bytes and never runs code, so a pickle (or
    anything else) planted where a checkpoint is expected is refused, not executed."""
    try:
        return st_load(blob)
    except (SafetensorError, ValueError) as e:
        raise HydraPipeError(f"{path}: not a safetensors {what} ({e})") from None


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and raw bytes of ``tensors`` (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


STATE_KEY = "hydra_pipe_state"


def write_state(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """One atomic file holding ``tensors`` and the JSON ``meta`` (in the safetensors header, next to a digest of
    the tensors): what training needs to resume, without pickle."""
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    meta = {**meta, "tensors_sha256": tensor_digest(tensors)}
    atomic_write_bytes(Path(path), st_save(tensors, metadata={STATE_KEY: json.dumps(meta)}))


def read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and JSON of a :func:`write_state` file, refused with one line if the file is anything else
    (not safetensors, no state JSON, tensors that do not match their digest)."""
    blob = _read_bytes(path, "resume state")
    tensors = _parse(blob, path, "resume state")
    try:  # st_load has validated the header: 8 bytes of length, then that much JSON
        (n,) = struct.unpack("<Q", blob[:8])
        meta = json.loads(json.loads(blob[8:8 + n])["__metadata__"][STATE_KEY])
        recorded = meta["tensors_sha256"]
    except (KeyError, TypeError, ValueError):
        raise HydraPipeError(f"{path}: not a resume state (no state record in its header)") from None
    if recorded != tensor_digest(tensors):
        raise HydraPipeError(f"{path}: resume state is corrupt (its tensors do not match the digest in its header)")
    return tensors, meta
