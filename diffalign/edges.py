"""The edge layer every command goes through: models, dtypes, prompts, rewards, files.

One spelling per concept, one implementation per edge, so `train`, `eval`, `label`, `cache`,
`reno`, `score` and `captions` read their inputs the same way:

- `load_pipeline(model, dtype, device)`: a diffusers pipeline from a hub id, a local folder or
  a shipped toy name (`toy-sd`, `toy-flow`).
- `sampling_defaults(model)`: a model's own `num_inference_steps` / `guidance_scale` (and size), read from
  `diffalign.json` in its folder (the toy models ship one), never from the model's name.
- `parse_dtype(name)`: `fp32 | fp16 | bf16`.
- `read_prompts(source)`: `toy`, or a .txt / .jsonl / .json file.
- `parse_reward_specs(text)` / `load_rewards(specs)`: the one reward grammar,
  comma-separated `NAME[@PATH][=WEIGHT]`, e.g. `hpsv2.1@ckpt/HPS_v2.1_compressed.pt=5,pickscore=0.05`.
  NAME is a registry name (`diffalign.rewards.REWARDS`) or `module:function`, a plain callable
  `(images (B, 3, H, W) in [0, 1], prompts) -> Tensor[B]`. PATH points a reward at local
  weights. WEIGHT counts where rewards are summed (reno, `label --rank-by weighted`); commands
  that report each reward on its own keep it in their records only.
- `atomic_write_bytes` / `atomic_write_text`: a reader never sees half a file; new files take the
  user's umask (`apply_umask` for writers that do not); `write_files`: a command's outputs, with a
  one-line error on a full disk.

Every check here raises a one-line `DiffalignError` naming the fix, and runs before any model
loads: commands parse their specs, dtypes and prompts first.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch

from diffalign.errors import DiffalignError

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAMPLING_FILE = "diffalign.json"
# height / width / num_frames: a model built for one size (the toy video model: 32 px x 9 frames)
# would otherwise be sampled at its pipeline's default (Wan: 480 x 832 x 81)
SAMPLING_KEYS = ("num_inference_steps", "guidance_scale", "height", "width", "num_frames")
REWARD_GRAMMAR = "NAME[@PATH][=WEIGHT],..."


# ------------------------------------------------------------------------------------- models

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def model_folder(model: str | Path) -> Path | None:
    """The local folder of `model`: the path itself, or the shipped asset of a toy name
    ("toy-sd"); None for a hub id."""
    from diffalign.paths import asset

    path = Path(model).expanduser()
    if path.exists():
        return path
    name = str(model)
    if name.startswith("toy-") and asset(name).is_dir():
        return asset(name)
    return None


def load_pipeline(model: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
                  **from_pretrained_kwargs: Any) -> DiffusionPipeline:
    """A diffusers pipeline from a hub id, a local folder or a shipped toy name ("toy-sd",
    "toy-flow"), with one-line errors for what a user can fix; moved to `device` when given, with
    its progress bar off (commands show their own).

    Components saved as null (SD3 without T5: text_encoder_3/tokenizer_3) are passed as None
    again, which `from_pretrained` needs to load such a folder.
    """
    from diffusers import DiffusionPipeline

    name = str(model)
    folder = model_folder(model)
    kwargs = dict(from_pretrained_kwargs)
    if folder is not None:
        if not (folder / "model_index.json").is_file():
            raise DiffalignError(f"model folder {name!r} has no model_index.json: pass a diffusers pipeline folder (save_pretrained output)")
        source = str(folder)
        index = json.loads((folder / "model_index.json").read_text())
        nulls = {k: None for k, v in index.items() if isinstance(v, list) and v and v[0] is None}
        kwargs = {**nulls, **kwargs}
    elif _HUB_ID.match(name) and not name.startswith((".", "~")):
        source = name
    else:
        raise DiffalignError(f"model {name!r} is neither an existing folder nor a hub id: check the path, or pass a hub id like 'owner/name'")
    try:
        with warnings.catch_warnings():
            # Recent diffusers renamed torch_dtype to dtype and warn on the old name; the
            # releases we support (>= 0.32) all accept torch_dtype, not all accept dtype.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DiffalignError(
            f"could not load model {name!r} ({reason[:200]}): download it first (HF_HUB_OFFLINE=1 needs it in the "
            "local cache) or pass a local diffusers folder"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe if device is None else pipe.to(torch.device(device))


def sampling_defaults(model: Any) -> dict[str, Any]:
    """The model's default sampler settings from `diffalign.json` in its folder, e.g.
    {"num_inference_steps": 20, "guidance_scale": 4.0}; {} when there is none (a hub id, a
    pipeline object, a folder without the file): then the pipeline's own defaults apply."""
    if not isinstance(model, (str, Path)):
        return {}
    folder = model_folder(model)
    file = folder / SAMPLING_FILE if folder is not None else None
    if file is None or not file.is_file():
        return {}
    try:
        settings = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise DiffalignError(f"{file} is not valid JSON ({err.msg}, line {err.lineno}): fix or delete it") from None
    unknown = sorted(set(settings) - set(SAMPLING_KEYS)) if isinstance(settings, dict) else ["(not an object)"]
    if unknown:
        raise DiffalignError(f"{file} has unknown keys {', '.join(unknown)}: it may hold {', '.join(SAMPLING_KEYS)}")
    return dict(settings)


def native_resolution(model: Any) -> int | None:
    """The image size a model was built for, from its configs alone (no weights load): the
    denoiser's `sample_size` times the VAE's downsampling. A local folder is read directly, a hub
    id from the local hub cache only; None when the configs are not at hand."""
    if not isinstance(model, (str, Path)):
        return None
    denoiser = _model_config(model, "unet") or _model_config(model, "transformer")
    vae = _model_config(model, "vae")
    if not denoiser or not vae or not isinstance(denoiser.get("sample_size"), int):
        return None
    return denoiser["sample_size"] * 2 ** (len(vae.get("block_out_channels", [0])) - 1)


def _model_config(model: str | Path, component: str) -> dict | None:
    folder = model_folder(model)
    if folder is not None:
        path = folder / component / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(str(model), f"{component}/config.json")
        path = Path(found) if isinstance(found, str) else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'fp32' | 'fp16' | 'bf16' -> torch dtype (a torch.dtype passes through)."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise DiffalignError(f"unknown dtype {name!r}: use one of {' | '.join(DTYPES)}")
    return DTYPES[name]


def default_device(device: str | torch.device | None = None) -> torch.device:
    """`device`, else cuda when available, else cpu."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


# ------------------------------------------------------------------------------------ prompts


def read_prompts(source: str | Path) -> list[str]:
    """'toy' (the toy world's held-out prompts), or a .txt (one a line), .jsonl
    ({"prompt": ...} a line) or .json (a list of strings) file."""
    if str(source) == "toy":
        from diffalign.paths import asset

        source = asset("toy-data") / "prompts_heldout.txt"
        if not source.is_file():
            raise DiffalignError(f"{source} is missing: reinstall diffalign, or rebuild it from a clone with "
                                 "`python -m tools.toy build --only toy-data`")
    path = Path(source)
    if not path.is_file():
        raise DiffalignError(f"prompt file {str(source)!r} not found: pass --prompts toy or a .txt, .jsonl or .json file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    obj = None
                if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                    raise DiffalignError(f"line {n} of {path} has no string \"prompt\": write {{\"prompt\": \"...\"}} a line")
                prompts.append(obj["prompt"])
    elif path.suffix == ".json":
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as err:
            raise DiffalignError(f"{path} is not valid JSON ({err.msg}, line {err.lineno}): write a list of strings") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise DiffalignError(f"{path} must hold a JSON list of strings")
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DiffalignError(f"prompt file {str(source)!r} holds no prompts: add one prompt a line")
    return prompts


# ------------------------------------------------------------------------------------ rewards


@dataclass(frozen=True)
class RewardSpec:
    """One item of a reward spec: NAME[@PATH][=WEIGHT]."""

    name: str  # a registry name, or module:function
    path: str | None = None  # local weights (file or folder) for a registry reward
    weight: float | None = None  # None: not given (1 where rewards are summed)

    def __str__(self) -> str:
        path = f"@{self.path}" if self.path is not None else ""
        weight = f"={self.weight:g}" if self.weight is not None else ""
        return f"{self.name}{path}{weight}"

    @property
    def display_name(self) -> str:
        """What records and tables call it: the registry name, or the function's name."""
        return self.name.rpartition(":")[2] if self.is_callable else self.name

    @property
    def is_callable(self) -> bool:
        from diffalign.rewards import REWARDS

        return self.name not in REWARDS and ":" in self.name


def _parse_item(item: str) -> RewardSpec:
    head, weight = item, None
    if "=" in item:
        head, _, text = item.rpartition("=")
        try:
            weight = float(text)
        except ValueError:
            if "@" not in head:  # a path may hold '=': then it is the path's, not a weight
                raise DiffalignError(f"reward weight {text!r} in {item!r} is not a number: write {REWARD_GRAMMAR}") from None
            head, weight = item, None
    name, at, path = head.partition("@")
    name, path = name.strip(), path.strip()
    if not name or (at and not path):
        raise DiffalignError(f"reward spec {item!r} is malformed: write {REWARD_GRAMMAR}, e.g. hpsv2.1@weights/hps.pt=5")
    return _check(RewardSpec(name, path or None, weight))


def _check(spec: RewardSpec) -> RewardSpec:
    from diffalign.rewards import REWARDS

    if spec.name in REWARDS:
        return spec
    if ":" not in spec.name:
        raise DiffalignError(f"unknown reward {spec.name!r}: choose one of {', '.join(sorted(REWARDS))}, or write module:function")
    if spec.path is not None:
        raise DiffalignError(f"reward {spec.name!r} is a callable: it takes no @PATH (load weights inside the function)")
    _import_callable(spec.name)  # a typo fails here, before any model loads
    return spec


def _import_callable(name: str) -> Any:
    module_name, _, attribute = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as err:
        raise DiffalignError(f"cannot import reward {name!r} ({err}): check module:function") from None
    if not callable(fn):
        raise DiffalignError(f"reward {name!r} is not callable: name a function (images, prompts) -> Tensor[B]")
    return fn


def parse_reward_specs(specs: str | RewardSpec | Iterable[str | RewardSpec]) -> list[RewardSpec]:
    """'a@PATH=5,b' (or a list of such strings / RewardSpecs) -> [RewardSpec, ...], checked:
    known names, importable callables, numeric weights, no name twice, at least one."""
    items = [specs] if isinstance(specs, (str, RewardSpec)) else list(specs)
    parsed: list[RewardSpec] = []
    for item in items:
        if isinstance(item, RewardSpec):
            parsed.append(_check(item))
        elif isinstance(item, str):
            parsed += [_parse_item(part.strip()) for part in item.split(",") if part.strip()]
        else:
            raise DiffalignError(f"reward spec {item!r} is not a string: write {REWARD_GRAMMAR}")
    if not parsed:
        raise DiffalignError(f"no reward given: pass --reward {REWARD_GRAMMAR} (e.g. toy-reward,toy-judge)")
    _no_name_twice([spec.display_name for spec in parsed])
    return parsed


def _no_name_twice(names: list[str]) -> None:
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice:
        raise DiffalignError(f"reward {twice!r} appears twice: name each reward once")


def load_rewards(specs: Any, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                 options: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Build rewards: {name: Reward} (each has `score(images, prompts) -> Tensor[B]`).

    `specs` is a spec string, a list of spec strings / RewardSpecs, or a list that also holds
    ready-made Rewards and plain callables (named by their `name` / `__name__`). Every string is
    parsed before the first reward loads. `options[name]` go to that reward's builder.
    """
    from diffalign.rewards import FunctionReward, as_reward, load_reward

    items = [specs] if isinstance(specs, (str, RewardSpec)) else list(specs)
    entries: list[Any] = []  # RewardSpecs to load, and ready-made rewards
    for item in items:
        entries += parse_reward_specs(item) if isinstance(item, (str, RewardSpec)) else [as_reward(item)]
    if not entries:
        raise DiffalignError(f"no reward given: pass --reward {REWARD_GRAMMAR} (e.g. toy-reward,toy-judge)")
    names = [entry.display_name if isinstance(entry, RewardSpec) else entry.name for entry in entries]
    _no_name_twice(names)
    torch_dtype = parse_dtype(dtype) if dtype is not None else None
    loaded: dict[str, Any] = {}
    for name, entry in zip(names, entries):
        if not isinstance(entry, RewardSpec):
            loaded[name] = entry
        elif entry.is_callable:
            loaded[name] = FunctionReward(_import_callable(entry.name), name)
        else:
            loaded[name] = load_reward(entry.name, path=entry.path, device=device, dtype=torch_dtype,
                                       **(options or {}).get(entry.name, {}))
    return loaded


# -------------------------------------------------------------------------------------- files


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it over `path`:
    a reader (or a resumed run) sees the old file or the new one, never half of one. A failed
    write removes its temporary file and re-raises."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def file_mode() -> int:
    """The mode the user's umask gives a new file (0o644 under the usual umask 022)."""
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def apply_umask(path: str | Path) -> Path:
    """Give a file the user's umask mode: writers that go through `tempfile` (safetensors' atomic
    save) leave 0600, readable by the owner only."""
    os.chmod(path, file_mode())
    return Path(path)


def size_text(nbytes: int) -> str:
    """Bytes as a person reads them: 340 KiB, 12.5 MiB, 3.2 GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{max(1, math.ceil(nbytes / 2**10))} KiB"


def write_files(folder: str | Path, files: dict[str, bytes], what: str) -> list[Path]:
    """Write `files` ({name: bytes}) into `folder`, each atomically. A full disk or any other
    OSError ends in one line naming the file, what was written and the space the rest needs;
    no partial file stays behind."""
    folder, written = Path(folder), []
    for name, data in files.items():
        try:
            written.append(atomic_write_bytes(folder / name, data))
        except OSError as err:
            rest = [n for n in files if folder / n not in written]
            kept = f"written: {', '.join(p.name for p in written)}" if written else "none of them was written"
            raise DiffalignError(
                f"could not write {what} {folder / name} ({err.strerror or err}); {kept}; the rest ({', '.join(rest)}) "
                f"needs {size_text(sum(len(files[n]) for n in rest))}: free space or choose another --output-dir"
            ) from None
    return written
