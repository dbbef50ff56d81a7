"""hydra-pipe: HYDRA pruning of adversarially robust networks, from pretraining to an audited int8 ONNX model."""

__version__ = "0.1.0"
