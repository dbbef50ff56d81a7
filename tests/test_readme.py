"""The README's figures are the committed metrics: a figure typed by hand, or a metric committed without
regenerating the README, fails here."""

from pathlib import Path

import pytest

from stages.figures import BLOCKS, readme_block

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_readme_blocks_equal_what_they_are_generated_from(name):
    assert readme_block((ROOT / "README.md").read_text(), name) == BLOCKS[name](ROOT)


def test_the_readme_s_comparison_table_command_drops_the_columns_it_says():
    """DVC matches ``--drop`` from the start of a column's name: ``'\\.(py|...)$'`` dropped nothing."""
    import re
    import shlex
    import shutil
    import subprocess
    import sys

    line = next(ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith("dvc exp show"))
    args = shlex.split(line.split("#")[0])
    pattern = args[args.index("--drop") + 1]
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or "dvc"

    def columns(*extra: str) -> list[str]:
        out = subprocess.run([dvc, "exp", "show", "--csv", *extra], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()[0].split(",")

    every, kept = columns(), columns("--drop", pattern)
    dropped = set(every) - set(kept)
    assert dropped and all(re.search(r"\.(py|json|onnx|safetensors)$", c) for c in dropped)
    assert any(c.startswith("metrics/audit.json:") for c in kept)  # the figures stay
