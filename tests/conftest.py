"""Test setup shared by the whole suite.

- Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors. The flag must be
  set before triton compiles any @triton.jit function, hence here, before ioattn is imported.
- Outputs are allocated NaN-poisoned (IOATTN_POISON=1) so a tile a kernel forgot to write fails.
- `gpu`-marked tests run only where CUDA is available; `slow` ones only with IOATTN_SLOW=1.
- launch.py's call sites verify themselves: a launch whose site key was seen is built again and
  compared with the kept one, so a key that misses an argument fails the test that reaches it.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["IOATTN_POISON"] = "1"

import pytest  # noqa: E402

# pytest-xdist workers each get their share of the cores: with torch's default (every core per
# process), 8 workers on 16 cores oversubscribe 8x and the CPU-backend tests crawl.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_slow = pytest.mark.skip(reason="slow; set IOATTN_SLOW=1")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and os.environ.get("IOATTN_SLOW") != "1":
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True, scope="session")
def _verify_launch_sites():
    from ioattn import launch
    launch.VERIFY_SITES = True
    yield
    launch.VERIFY_SITES = False


@pytest.fixture(autouse=True)
def _seed():
    # Fresh random inputs on every run; the seed is printed so pytest shows it with a failure
    # (rerun with IOATTN_SEED=<seed> to reproduce).
    seed = int(os.environ.get("IOATTN_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"seed={seed}")
    torch.manual_seed(seed)
    yield
