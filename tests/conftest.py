"""Test-wide settings: Triton kernels run on the CPU interpreter when no GPU is present."""
from __future__ import annotations

import os

# Must happen before triton is first imported anywhere in the test session.
if os.environ.get("TGOLF_TEST_GPU") != "1":
    try:
        import ctypes.util

        _has_cuda_driver = ctypes.util.find_library("cuda") is not None
    except Exception:  # pragma: no cover - defensive
        _has_cuda_driver = False
    if not _has_cuda_driver:
        os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from _failure_log import pytest_runtest_logreport  # noqa: E402,F401  (a hook: failures logged as they happen)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


SHARED_DATA = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
    """../shared/data beside the checkout (real text and tokenizers); tests that need it skip without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, shared_data):
    """A data folder with random-token train/val shards (vocab 1024) and the sp1024 tokenizer beside them."""
    import shutil

    import numpy as np

    from tgolf.data.shards import write_shard

    folder = tmp_path_factory.mktemp("tiny_shards")
    rng = np.random.default_rng(0)
    for name, n in (("fineweb_train_000000.bin", 60_000), ("fineweb_train_000001.bin", 40_000),
                    ("fineweb_val_000000.bin", 9_000)):
        # a learnable stream: each token mostly determines the next (so loss can fall below ln(1024))
        tokens = np.empty(n, dtype=np.uint16)
        tokens[0] = 1
        noise = rng.random(n) < 0.1
        for i in range(1, n):
            tokens[i] = rng.integers(4, 1024) if noise[i] else (int(tokens[i - 1]) * 7 + 3) % 1020 + 4
        tokens[:: 97] = 1  # documents start with BOS
        write_shard(folder / name, tokens)
    shutil.copyfile(shared_data / "tokenizers" / "fineweb_1024_bpe.model", folder / "tokenizer.model")
    return folder
