import logging
import warnings

import pytest
import torch


@pytest.fixture
def quiet_single_thread():
    """One intra-op thread (tiny tensors on 2 shared cores run far faster) and no Lightning chatter."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
