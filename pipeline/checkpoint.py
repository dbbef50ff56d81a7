"""Checkpoints: safetensors (never pickle) plus a JSON sidecar, both written atomically.

A checkpoint stores the *folded* dense weights (``weight * mask``: zeros exactly where pruned), so standard
``Conv2d`` / ``Linear`` layers load it, and the masks under ``mask/<layer>`` so finetuning keeps them frozen.
The sidecar records the architecture, the dataset facts needed to rebuild the model, the params hash, the parent
checkpoint and the sparsity.
"""

from __future__ import annotations

import json
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
    atomic_write_bytes(Path(path), st_save(tensors, metadata={"arch": arch}))
    write_json(sidecar_path(path), meta)


def read_sidecar(path: Path) -> dict[str, Any]:
    side = sidecar_path(path)
    try:
        meta = json.loads(side.read_text())
    except FileNotFoundError:
        raise HydraPipeError(f"{side}: checkpoint sidecar not found") from None
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
    try:
        tensors = st_load(path.read_bytes())
    except FileNotFoundError:
        raise HydraPipeError(f"{path}: checkpoint not found") from None
    except (SafetensorError, ValueError) as e:
        raise HydraPipeError(f"{path}: not a safetensors checkpoint ({e})") from None
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
