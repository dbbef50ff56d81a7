"""``python -m stages ...`` is ``hydra-pipe ...`` (what ``bin/hydra-pipe``, the stages' command in dvc.yaml, runs)."""

from stages.cli import app

app(prog_name="hydra-pipe")
