"""The one exception type the CLI turns into a single line on stderr and exit code 2 (its ``exit_code``)."""


class HydraPipeError(Exception):
    """Bad input or an unsupported request: the message names the file, the field and what was expected."""

    exit_code = 2


class BelowFloorError(HydraPipeError):
    """A release floor was not met (the export's ``export.floor`` with ``below_floor: refuse``): exit code 3, as
    ``hydra-pipe audit --fail-under``'s gate, so CI tells it from bad input."""

    exit_code = 3


class UnsupportedOpError(HydraPipeError):
    """An ONNX operator outside the converter's vocabulary."""

    def __init__(self, op_type: str, node_name: str, path: str = "") -> None:
        where = f"{path}: " if path else ""
        super().__init__(f"{where}unsupported ONNX op {op_type!r} at node {node_name!r}")
        self.op_type = op_type
        self.node_name = node_name
