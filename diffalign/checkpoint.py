"""Atomic checkpoints: write to a temporary folder, then rename; keep the last N.

A checkpoint folder `checkpoint-<step>/` holds accelerate's state (optimiser, scheduler, RNG,
dataloader position) plus the trainable weights, and `trainer_state.json` (step, epoch, the
number of groups consumed in the epoch). A crash mid-write leaves only a `.tmp-*` folder, which
is never picked up by `--resume latest` and is cleaned up on the next save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from diffalign.errors import DiffalignError

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """`latest` -> the newest finished checkpoint (None when there is none yet); a path -> itself."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise DiffalignError(
            f"--resume {resume!r} is not a diffalign checkpoint (no trainer_state.json): "
            f"pass 'latest' or a folder under OUTPUT/checkpoints/"
        )
    return path


def save_checkpoint(accelerator, output_dir: str | Path, step: int, trainer_state: dict, keep: int) -> Path:
    """Save accelerate state + trainer_state.json atomically as checkpoints/checkpoint-<step>."""
    root = Path(output_dir) / "checkpoints"
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-checkpoint-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _prune(root, keep)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DiffalignError(
            f"could not write checkpoint {final} ({err.strerror or err}): free disk space or choose another --output-dir; "
            f"earlier checkpoints are intact"
        ) from err
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> dict:
    accelerator.load_state(str(path))
    return json.loads((path / "trainer_state.json").read_text())


def _prune(root: Path, keep: int) -> None:
    found = list_checkpoints(root.parent)
    for old in found[: max(0, len(found) - max(keep, 1))]:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    """Flush the files of a checkpoint before it is renamed into place."""
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
