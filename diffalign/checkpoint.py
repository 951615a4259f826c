"""Atomic checkpoints: write to a temporary folder, then rename; keep the last N.

A checkpoint folder `checkpoint-<step>/` holds accelerate's state (optimiser, scheduler, RNG,
dataloader position) plus the trainable weights, and `trainer_state.json` (step, epoch, the
number of groups consumed in the epoch). A crash mid-write leaves only a `.tmp-*` folder, which
is never picked up by `--resume latest` and is cleaned up on the next save.

An output folder holds one run. `trainer_state.json` also records the run's config, and
`check_same_run` compares it (or the folder's config.yaml) with a new run's before any model
loads: a different run there fails, so a later `--resume latest` never continues the wrong one.
`RunLock` keeps two runs from writing into one folder at once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import warnings
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


# Config keys that make a run what it is: a folder (or a checkpoint) with other values holds
# another run. Keys not listed (max_steps, logging, evaluation, workers, ...) may change on resume.
RUN_IDENTITY = (
    "method", "model", "dataset", "beta", "objective", "lora_rank", "lora_alpha", "lora_targets", "full_finetune",
    "resolution", "batch_size", "grad_accum", "lr", "scale_lr", "optimizer", "lr_scheduler", "seed",
)


def check_same_run(config: dict, output_dir: str | Path, resume_from: Path | None) -> None:
    """Refuse, in one line, a folder or checkpoint that belongs to another run."""
    out = Path(output_dir)
    if resume_from is not None:
        state = json.loads((resume_from / "trainer_state.json").read_text())
        saved, where = state.get("config"), f"checkpoint {resume_from}"
        if saved is not None and config["max_steps"] < state["step"]:
            raise DiffalignError(
                f"--max-steps {config['max_steps']} is below the checkpoint's step {state['step']}: raise --max-steps "
                "to continue the run, or start a new one in another --output-dir"
            )
    else:
        import yaml

        path = out / "config.yaml"
        saved = yaml.safe_load(path.read_text()) if path.is_file() else None
        where = f"output folder {out}"
    if not saved:
        return
    changed = [k for k in RUN_IDENTITY if k in saved and saved[k] != config.get(k)]
    if not changed:
        return
    key = changed[0]
    also = f" (and {', '.join(changed[1:])})" if len(changed) > 1 else ""
    fix = (
        "resume with the run's own settings, or start a new run in another --output-dir"
        if resume_from is not None else "choose another --output-dir, or delete that folder to start over"
    )
    raise DiffalignError(
        f"{where} holds another run: its {key} is {saved[key]!r}, this run's is {config.get(key)!r}{also}; {fix}"
    )


class RunLock:
    """OUTPUT/.lock names the process that trains into the folder; a second run there refuses.

    A lock left by a killed run (its process is gone) is taken over with a warning. Only the
    main process of a launch holds it (`enabled`)."""

    def __init__(self, output_dir: str | Path, enabled: bool = True):
        self.path = Path(output_dir) / ".lock"
        self.enabled = enabled

    def __enter__(self) -> "RunLock":
        if not self.enabled:
            return self
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return self
        raise DiffalignError(f"could not lock output folder {self.path.parent}: remove {self.path} if no run uses it")

    def _take_over_if_stale(self) -> None:
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            owner = {}
        pid, host = owner.get("pid"), owner.get("host")
        if host == socket.gethostname() and isinstance(pid, int) and _alive(pid):
            raise DiffalignError(
                f"output folder {self.path.parent} is in use by another diffalign run (pid {pid}): wait for it to "
                "finish, or choose another --output-dir"
            )
        if host not in (None, socket.gethostname()):
            raise DiffalignError(
                f"output folder {self.path.parent} is locked by a run on host {host} (pid {pid}): choose another "
                f"--output-dir, or delete {self.path} if that run is over"
            )
        warnings.warn(f"taking over {self.path}: the run that left it (pid {pid}) is gone", stacklevel=3)
        self.path.unlink(missing_ok=True)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


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
    except (OSError, RuntimeError) as err:
        # A full disk surfaces as OSError from our writes and as RuntimeError from torch's
        # serialisation ("PytorchStreamWriter failed writing file").
        if isinstance(err, RuntimeError) and "writ" not in str(err).lower():
            raise
        needed = _size(tmp) if tmp.exists() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        found = list_checkpoints(output_dir)
        kept = f"the last complete checkpoint is {found[-1]}" if found else "no earlier checkpoint exists"
        size = max(needed, _size(found[-1]) if found else 0)
        reason = getattr(err, "strerror", None) or str(err).splitlines()[0][:120]
        raise DiffalignError(
            f"could not write checkpoint {final} ({reason}); {kept}: free at least {size / 2**20:.0f} MiB "
            "(one checkpoint) or choose another --output-dir, then --resume latest"
        ) from err
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> dict:
    """Restore accelerate's state; returns the trainer state (step, epoch, consumed)."""
    accelerator.load_state(str(path))
    state = json.loads((path / "trainer_state.json").read_text())
    state.pop("config", None)
    return state


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


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
