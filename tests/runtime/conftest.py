import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: OpenMP fork/join costs more than it saves on the shared 2-core box (measured
    under load: transformers' generate 18 s -> 2.2 s for 48 tokens; a tiny decode step 180 ms ->
    1.9 ms with 1 thread instead of 2)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
