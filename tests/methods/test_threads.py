import pytest
import torch

from ttq.methods.threads import one_cpu_thread


def test_one_cpu_thread_sets_one_and_restores_the_count():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_cpu_thread(torch.device("cpu")):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), one_cpu_thread(torch.device("cpu")):
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 2  # restored after an error too
        with one_cpu_thread(torch.device("meta")):  # other devices: torch's CPU threads untouched
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)
