"""Settings and fixtures every test shares.

Tiny pipelines come from `diffalign.testing` (one builder per family, in the family's file);
data helpers from tests/helpers.py.
"""

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
for path in (str(TESTS), str(ROOT)):  # `from helpers import ...`, and tools/ (not installed)
    if path not in sys.path:
        sys.path.insert(0, path)

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


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Keep the `datasets` arrow cache inside the test's tmp dir."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.fixture(autouse=True)
def _no_stream_shutdown_sleep(monkeypatch):
    """`datasets` sleeps 5 s when a shuffled parquet stream ends (thread shutdown): not in tests."""
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


@pytest.fixture(scope="session")
def tiny_sd():
    """The tiny SD pipeline object (DDIM), shared: tests must not change it."""
    from diffalign.testing import tiny_pipeline

    pipe = tiny_pipeline("sd")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """The tiny SD pipeline saved with save_pretrained: the folder/hub-id loading path."""
    from diffalign.testing import save_tiny_pipeline

    return str(save_tiny_pipeline("sd", tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    from diffalign.testing import save_tiny_pipeline

    return str(save_tiny_pipeline("sd3", tmp_path_factory.mktemp("tiny-sd3")))


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory):
    """CLIP's full tokenizer, written offline (for the captioner/paraphraser tests)."""
    from diffalign.rewards.clip_tokenizer import write_clip_tokenizer

    return write_clip_tokenizer(tmp_path_factory.mktemp("clip-tokenizer"))


@pytest.fixture(scope="session")
def pairs_parquet(tmp_path_factory):
    """8 Pick-a-Pic rows (winner in either column) plus one tie that must be dropped."""
    from helpers import png, write_parquet

    rows = []
    for i in range(8):
        win, lose = png((200, 20 * i, 30), 36), png((30, 20 * i, 200), 36)
        first_wins = i % 2 == 0
        rows.append({
            "caption": f"a red square number {i}",
            "jpg_0": win if first_wins else lose,
            "jpg_1": lose if first_wins else win,
            "label_0": 1.0 if first_wins else 0.0,
            "label_1": 0.0 if first_wins else 1.0,
        })
    rows.append({"caption": "a tie", "jpg_0": png((0, 0, 0), 36), "jpg_1": png((9, 9, 9), 36), "label_0": 0.5,
                 "label_1": 0.5})
    return str(write_parquet(tmp_path_factory.mktemp("data") / "pairs.parquet", rows))


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\ntwo blue squares\na green triangle on the left\nthree yellow stars\na cat\n")
    return path


@pytest.fixture(scope="session")
def hps_checkpoint(tmp_path_factory):
    """HPS_v2.1_compressed.pt with random weights: {'state_dict': open_clip state dict}."""
    from helpers import TINY_OPEN_CLIP

    from diffalign.rewards.clip import build_open_clip

    torch.manual_seed(0)
    model, _ = build_open_clip(TINY_OPEN_CLIP)
    folder = tmp_path_factory.mktemp("hps")
    torch.save({"state_dict": model.state_dict()}, folder / "HPS_v2.1_compressed.pt")
    torch.save({"state_dict": model.state_dict()}, folder / "HPS_v2_compressed.pt")
    return folder


@pytest.fixture(scope="session")
def hf_clip_folder(tmp_path_factory):
    """A PickScore_v1-style folder: CLIPModel weights + CLIP processor files (offline tokenizer)."""
    from helpers import tiny_hf_clip_config
    from transformers import CLIPImageProcessor, CLIPModel

    from diffalign.rewards.clip_tokenizer import write_clip_tokenizer

    torch.manual_seed(0)
    model = CLIPModel(tiny_hf_clip_config()).eval()
    folder = tmp_path_factory.mktemp("pickscore")
    model.save_pretrained(folder)
    write_clip_tokenizer(folder)
    # CLIP-H's processor settings: shortest edge 224, centre crop 224, bicubic, OpenAI mean/std.
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder
