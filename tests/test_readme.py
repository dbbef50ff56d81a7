"""The README's figures are the committed metrics: a figure typed by hand, or a metric committed without
regenerating the README, fails here."""

from pathlib import Path

import pytest

from stages.figures import BLOCKS, readme_block

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_readme_blocks_equal_what_they_are_generated_from(name):
    assert readme_block((ROOT / "README.md").read_text(), name) == BLOCKS[name](ROOT)
