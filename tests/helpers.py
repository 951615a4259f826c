"""Helpers shared by the tests (import with `from helpers import ...`; tests/conftest.py puts
tests/ on sys.path): tiny preference data in the Pick-a-Pic and JSONL layouts, and rewards a
test can check by hand."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(seed: int, size: tuple[int, int] = (12, 10), fmt: str = "PNG") -> bytes:
    """A small random RGB image (lossless PNG by default, so pixels can be compared exactly)."""

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


def png(colour, size: int = 32) -> bytes:
    """A flat-coloured PNG."""

    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def redness(images, prompts):
    """A reward a test can check by hand: mean red minus mean green, (B,)."""
    return images[:, 0].mean(dim=(1, 2)) - images[:, 1].mean(dim=(1, 2))


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def brightness_noting_the_process(images, prompts):
    """`brightness`, and a line naming this process's rank in $SCORED_BY (which processes scored)."""
    with open(os.environ["SCORED_BY"], "a") as log:
        log.write(f"{os.environ.get('RANK', '0')}\n")
    return brightness(images, prompts)


# Reward backbones with the original key layouts, scaled down.
# open_clip CLIP with HPSv2's key naming (ViT-H-14 scaled down); 224 px so the real
# preprocessing sizes are exercised, patch 32 so the vision tower stays tiny.
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def tiny_hf_clip_config():
    """A CLIPConfig in PickScore's (CLIP-H) layout, scaled down, at the real 224-pixel input."""
    from transformers import CLIPConfig

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                vocab_size=49408, max_position_embeddings=77)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=224, patch_size=32)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def random_pil(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random image (smooth so resize methods agree closely, as on real photos)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(max(height // 16, 2), max(width // 16, 2), 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.BILINEAR)


# --------------------------------------------------------------------------- the CLI in a subprocess
REPO = Path(__file__).resolve().parents[1]


def cli_command(flags: list[str], processes: int = 1) -> list[str]:
    """`python -m diffalign.cli FLAGS`, or the same under `accelerate launch` with 2 CPU
    processes (gloo, configs/accelerate/cpu2.yaml)."""
    if processes == 1:
        return [sys.executable, "-m", "diffalign.cli", *flags]
    assert processes == 2, "configs/accelerate/cpu2.yaml launches 2 processes"
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "configs/accelerate/cpu2.yaml"), "-m", "diffalign.cli", *flags]


def run_cli(cmd: list[str], timeout: int = 280, env: dict | None = None) -> str:
    """Run a command with one torch thread in every process (so one and two processes compute
    with the same kernels), tests/ importable (`--reward helpers:brightness`) and `env` added;
    its stdout."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def metrics_rows(out: Path) -> list[dict]:
    """A run folder's metrics.jsonl, one dict a logged step."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
