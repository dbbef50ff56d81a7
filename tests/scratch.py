"""A scratch pipeline folder for tests that run stages as a user would (the DVC layout relative to the cwd)."""

from pathlib import Path

import yaml


def scratch(root: Path, name: str, params: dict) -> Path:
    """``root/name`` holding a ``params.yaml`` with ``params`` (the rest of the params take their defaults)."""
    d = root / name
    d.mkdir()
    (d / "params.yaml").write_text(yaml.safe_dump(params))
    return d
