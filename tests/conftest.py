import os
import tempfile

import pytest
import torch

# Two cores on CI: keep each test on one thread so parallel work does not oversubscribe.
torch.set_num_threads(int(os.environ.get("DIFFALIGN_TEST_THREADS", "1")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Evaluations keep base-model images between runs; keep the tests' copies out of the user's cache.
os.environ.setdefault("DIFFALIGN_CACHE", tempfile.mkdtemp(prefix="diffalign-test-cache-"))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("RUN_SLOW") == "1":
        return
    skip_slow = pytest.mark.skip(reason="slow: set RUN_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
