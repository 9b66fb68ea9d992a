import logging
import warnings

import pytest
import torch

from lightning_winoprune.data import DigitsDataModule


@pytest.fixture
def quiet_single_thread():
    """One intra-op thread (tiny tensors on 2 shared cores run far faster) and no Lightning chatter."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    """Digits at 16x16: the small dataset of the callback tests."""
    return DigitsDataModule(image_size=16, batch_size=16)
