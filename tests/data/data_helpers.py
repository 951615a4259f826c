"""Tiny preference datasets built in tmp dirs: Pick-a-Pic parquet, save_to_disk, JSONL."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest


def image_bytes(seed: int, size: tuple[int, int] = (12, 10), fmt: str = "PNG") -> bytes:
    """A small random RGB image (lossless PNG by default, so pixels can be compared exactly)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def pickapic_rows(n: int, *, labels=None, captions: bool = False, size=(12, 10)) -> list[dict]:
    """n rows in the Pick-a-Pic v2 schema; label_0 cycles 1, 0, 0.5 unless given."""
    labels = labels or [[1.0, 0.0, 0.5][i % 3] for i in range(n)]
    rows = []
    for i in range(n):
        row = {
            "caption": f"prompt {i}",
            "jpg_0": image_bytes(2 * i, size),
            "jpg_1": image_bytes(2 * i + 1, size),
            "label_0": labels[i],
            "label_1": 1.0 - labels[i],
        }
        if captions:
            row["caption_0"] = f"caption {i} of image 0"
            row["caption_1"] = f"caption {i} of image 1"
        rows.append(row)
    return rows


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path: Path, objects: list) -> Path:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objects))
    return path


def write_image(path: Path, seed: int, size=(12, 10)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(seed, size))
    return path.name


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
