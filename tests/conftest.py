import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# parametrize a test over devices: the CUDA case skips without a GPU (and -k cuda selects it)
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=requires_cuda)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
