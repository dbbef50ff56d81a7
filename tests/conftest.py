import os

import pytest
import torch

os.environ.setdefault("HYDRA_PIPE_QUIET", "1")
torch.set_num_threads(1)


@pytest.fixture
def digits_info():
    from pipeline.config import DataParams
    from pipeline.data import load_dataset

    return load_dataset(DataParams()).info
