"""Latent + text-embedding cache: encode a preference dataset once, train without VAE or text encoders.

`diffalign cache --model M --dataset D --output-dir CACHE` (or `diffalign train --cache-latents`)
runs the model adapter's `encode_images` and `encode_prompts` (docs/architecture.md) over every
group once and writes safetensors shards under CACHE/<key>/, where the key hashes the model id,
the resolution, the dataset (its files' sizes and times when local) and the group settings.

Only the deterministic view is cached: centre crop, no flip. Random crops and flips change the
pixels every epoch, so they cannot be encoded ahead; a cached run trains on the centre view.

Layout of CACHE/<key>/:
    config.json                 what the key was made of, shard count, shard size
    shard-00000.safetensors     latents (N, C, h, w) for the N images of its G groups (best first;
                                videos: (N, C, F', h, w), the frames `num_frames`/`fps` sample),
                                group_offsets (G+1,), scores (N,), index (G,) (dataset index),
                                cond.<name> (U, ...) for the U unique texts (prompts and per-image
                                captions) of the shard, prompt_index (G,), caption_index (N,) into
                                them; metadata: the texts (JSON)
    empty.safetensors           cond.<name> (1, ...) of the empty prompt, for caption dropout
    manifest.json               the finished shards (informative; a shard file exists only once
                                it is complete, since it is written to a temp file and renamed)
Under several processes, process r encodes the shards s with s % world_size == r; a rerun
encodes only the missing shards, so an interrupted build resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Protocol

import torch

from diffalign.data import DataConfig, GroupDataset, SkipCounter, _BadImage, build_dataset, process_share
from diffalign.edges import atomic_write_bytes, atomic_write_text, parse_dtype
from diffalign.errors import DiffalignError

CACHE_FORMAT = 1


class Encoder(Protocol):
    """The two adapter methods the cache uses (diffalign.models.ModelAdapter has both)."""

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor: ...
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]: ...


# ----------------------------------------------------------------------------------------------
# The key


def _dataset_fingerprint(name: str) -> list:
    """(file, size, mtime) of a local dataset's files, so an edited dataset gets a new cache."""
    path = Path(name)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        return []  # a hub id: the id (and split) is the key
    return [[str(p.relative_to(path) if path.is_dir() else p.name), p.stat().st_size, p.stat().st_mtime_ns]
            for p in files]


def cache_settings(model_id: str, cfg: DataConfig, pairwise: bool) -> dict:
    """Everything that changes the cached tensors."""
    local = Path(cfg.dataset).exists()
    return {
        "format": CACHE_FORMAT,
        "model": model_id,
        "dataset": str(Path(cfg.dataset).resolve()) if local else cfg.dataset,
        "dataset_files": _dataset_fingerprint(cfg.dataset),
        "split": cfg.split,
        "resolution": cfg.resolution,
        "view": "center-crop, no flip",
        "pairwise": pairwise,
        "drop_ties": cfg.drop_ties,
        "group_size": cfg.group_size,
        "max_samples": cfg.max_samples,
        "columns": [cfg.caption_column, cfg.image_columns, cfg.label_columns],
        # video data: the sampled frames and the label (image caches keep their keys)
        **({"video": [cfg.num_frames, cfg.fps, cfg.video_label]} if cfg.num_frames is not None else {}),
    }


def cache_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Writing


def _shard_path(folder: Path, shard: int) -> Path:
    return folder / f"shard-{shard:05d}.safetensors"


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A shard exists only once complete (diffalign.edges.atomic_write_bytes)."""
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def _write_json_atomic(obj: Any, path: Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def _encode_in_batches(fn, items, batch_size: int):
    return [fn(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]


@torch.no_grad()
def encode_shard(adapter: Encoder, dataset: GroupDataset, indices: range, *, batch_size: int,
                 device: torch.device | str | None, skipped: SkipCounter) -> tuple[dict, dict]:
    """Encode the groups `indices` of the dataset: (tensors, metadata) of one shard."""
    groups, kept = [], []
    for i in indices:
        try:
            groups.append(dataset.load(i, augment=False))
            kept.append(i)
        except _BadImage as err:  # skipped for good: the cache holds only the good groups
            skipped.record(err)
    if not groups:
        return {}, {}
    pixels = torch.cat([g["pixels"] for g in groups])  # (N, 3, R, R), groups one after another
    latents = torch.cat(_encode_in_batches(
        lambda x: adapter.encode_images(x.to(device) if device is not None else x).cpu(), pixels, batch_size))

    # Prompts and per-image captions: objectives condition on one or the other (dcpo).
    prompts = [g["prompt"] for g in groups]
    captions = [c for g in groups for c in g["captions"]]
    unique = list(dict.fromkeys(prompts + captions))  # first-appearance order: deterministic
    position = {text: i for i, text in enumerate(unique)}
    conds = _encode_in_batches(lambda p: adapter.encode_prompts(p), unique, batch_size)
    tensors = {f"cond.{name}": torch.cat([c[name].cpu() for c in conds]) for name in conds[0]}

    sizes = torch.tensor([len(g["captions"]) for g in groups])
    tensors.update({
        "latents": latents,
        "group_offsets": torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]),
        "scores": torch.cat([g["scores"] for g in groups]).float(),
        "prompt_index": torch.tensor([position[p] for p in prompts], dtype=torch.long),
        "caption_index": torch.tensor([position[c] for c in captions], dtype=torch.long),
        "index": torch.tensor(kept, dtype=torch.long),
    })
    return tensors, {"texts": json.dumps(unique)}


def _finished_shards(folder: Path, num_shards: int) -> list[int]:
    return [s for s in range(num_shards) if _shard_path(folder, s).exists()]


def build_cache(adapter: Encoder, cfg: DataConfig, output_dir: str | Path, *, model_id: str, pairwise: bool = True,
                batch_size: int = 8, shard_size: int = 256, device: torch.device | str | None = None,
                rank: int | None = None, world_size: int | None = None) -> Path:
    """Encode this process's share of the cache (resuming), return the cache folder CACHE/<key>.

    Idempotent: finished shards are never re-encoded. Under several processes, wait for all of
    them (accelerator.wait_for_everyone()) before opening a CachedDataset.
    """
    from tqdm.auto import tqdm

    if cfg.streaming:
        raise DiffalignError("the latent cache needs a map-style dataset: set streaming false to build it")
    if batch_size < 1 or shard_size < 1:
        raise DiffalignError(f"batch_size and shard_size must be positive (got {batch_size}, {shard_size})")
    view = dataclasses.replace(cfg, center_crop=True, random_flip=False)
    dataset = build_dataset(view, pairwise=pairwise)
    settings = cache_settings(model_id, cfg, pairwise)
    folder = Path(output_dir) / cache_key(settings)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DiffalignError(f"cannot create the cache folder {folder} ({err.strerror}): choose a writable --output-dir") from None
    num_shards = (len(dataset) + shard_size - 1) // shard_size
    info = {"settings": settings, "num_groups": len(dataset), "shard_size": shard_size, "num_shards": num_shards}
    if not (folder / "config.json").exists():
        _write_json_atomic(info, folder / "config.json")

    default_rank, default_world = process_share()
    rank = default_rank if rank is None else rank
    world_size = default_world if world_size is None else world_size
    if not (folder / "empty.safetensors").exists():
        with torch.no_grad():
            empty = adapter.encode_prompts([""])
        _save_atomic({f"cond.{k}": v.cpu() for k, v in empty.items()}, folder / "empty.safetensors")

    mine = [s for s in range(num_shards) if s % world_size == rank and not _shard_path(folder, s).exists()]
    skipped = SkipCounter(cfg.strict)
    for shard in tqdm(mine, desc=f"cache (rank {rank})", disable=not mine):
        for stale in folder.glob(f"{_shard_path(folder, shard).name}.tmp-*"):  # from a killed run
            stale.unlink()
        indices = range(shard * shard_size, min(len(dataset), (shard + 1) * shard_size))
        tensors, metadata = encode_shard(adapter, dataset, indices, batch_size=batch_size, device=device,
                                         skipped=skipped)
        if not tensors:  # every group of the shard was bad: an empty shard keeps the numbering
            tensors = {"group_offsets": torch.zeros(1, dtype=torch.long)}
            metadata = {"texts": "[]"}
        _save_atomic(tensors, _shard_path(folder, shard), metadata)
        _write_json_atomic({"finished": _finished_shards(folder, num_shards), "num_shards": num_shards},
                           folder / "manifest.json")
    if skipped.total:
        warnings.warn(f"cache {folder}: {skipped.total} groups left out for bad images ({skipped.counts})", stacklevel=2)
    _write_json_atomic({"finished": _finished_shards(folder, num_shards), "num_shards": num_shards},
                       folder / "manifest.json")
    return folder


# ----------------------------------------------------------------------------------------------
# Reading


class CachedDataset(torch.utils.data.Dataset):
    """Groups from a finished cache folder, in dataset order (bad groups left out).

    Item: {"latents": (K, C, h, w), "prompt", "captions" (K), "scores" (K,),
           "cond": {name: (K, ...)}        each image's caption embedding (the prompt's when the
                                            data has no per-image captions),
           "prompt_cond": {name: (...)}    the prompt's embedding}.
    collate_groups stacks cond to (B, K, ...) and prompt_cond to (B, ...). The empty prompt's
    embedding, for caption dropout, is the dataset's `empty_cond` ({name: (1, ...)}).
    """

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        config_file = self.folder / "config.json"
        if not config_file.exists():
            raise DiffalignError(f"{self.folder} is not a diffalign cache (no config.json): build it with `diffalign cache`")
        self.info = json.loads(config_file.read_text())
        num_shards = self.info["num_shards"]
        done = _finished_shards(self.folder, num_shards)
        if len(done) < num_shards or not (self.folder / "empty.safetensors").exists():
            raise DiffalignError(
                f"cache {self.folder} is incomplete ({len(done)} of {num_shards} shards): "
                "run the same `diffalign cache` command again to finish it"
            )
        self.items: list[tuple[int, int]] = []  # (shard, group within the shard)
        self.texts: list[list[str]] = []  # per shard: its unique texts
        for shard in range(num_shards):
            with safe_open(str(_shard_path(self.folder, shard)), framework="pt") as f:
                self.texts.append(json.loads(f.metadata()["texts"]))
                n_groups = f.get_slice("group_offsets").get_shape()[0] - 1
            self.items += [(shard, g) for g in range(n_groups)]
        with safe_open(str(self.folder / "empty.safetensors"), framework="pt") as f:
            self.empty_cond = {k.removeprefix("cond."): f.get_tensor(k) for k in f.keys()}
        self._open: dict[int, Any] = {}

    @property
    def resolution(self) -> int:
        return int(self.info["settings"]["resolution"])

    def __len__(self) -> int:
        return len(self.items)

    def _shard(self, shard: int):
        """The shard's open file and its small index arrays as lists (read once: a slice a
        group costs more than the group's own tensors)."""
        from safetensors import safe_open

        # Opened lazily per process (handles are not picklable into DataLoader workers).
        if shard not in self._open:
            f = safe_open(str(_shard_path(self.folder, shard)), framework="pt")
            index = {name: f.get_tensor(name).tolist() for name in ("group_offsets", "prompt_index", "caption_index")}
            names = [k for k in f.keys() if k.startswith("cond.")]
            self._open[shard] = (f, index, names)
        return self._open[shard]

    def __getstate__(self):
        return {**self.__dict__, "_open": {}}

    def __getitem__(self, index: int) -> dict:
        shard, g = self.items[index]
        f, shard_index, names = self._shard(shard)
        a, b = shard_index["group_offsets"][g : g + 2]
        prompt_row = shard_index["prompt_index"][g]
        caption_rows = shard_index["caption_index"][a:b]
        texts = self.texts[shard]

        def rows(indices: list[int]) -> dict[str, torch.Tensor]:
            if indices == list(range(indices[0], indices[0] + len(indices))):  # consecutive: one slice
                return {k.removeprefix("cond."): f.get_slice(k)[indices[0] : indices[0] + len(indices)] for k in names}
            return {k.removeprefix("cond."): torch.cat([f.get_slice(k)[i : i + 1] for i in indices]) for k in names}

        return {
            "latents": f.get_slice("latents")[a:b],
            "prompt": texts[prompt_row],
            "captions": [texts[r] for r in caption_rows],
            "scores": f.get_slice("scores")[a:b],
            "cond": rows(caption_rows),
            "prompt_cond": {k: v[0] for k, v in rows([prompt_row]).items()},
        }


# ----------------------------------------------------------------------------------------------
# CLI: diffalign cache


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="diffusers folder, hub id, or toy-sd / toy-flow")
    parser.add_argument("--dataset", required=True, help="hub id, parquet file/folder, save_to_disk folder or .jsonl")
    parser.add_argument("--output-dir", required=True, help="cache root; the cache goes to OUTPUT/<key>/")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image size the latents are encoded at (default: the model's own, as train uses)")
    parser.add_argument("--batch-size", type=int, default=8, help="images (and captions) per encoder call")
    parser.add_argument("--shard-size", type=int, default=256, help="groups per safetensors shard")
    parser.add_argument("--split", default="train")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--ranked", action="store_true",
                        help="keep whole ranked lists and ties (for rankdpo); default: winner/loser pairs")
    parser.add_argument("--group-size", type=int, default=None, help="with --ranked: K images per group")
    parser.add_argument("--strict", action="store_true", help="a missing or corrupt image is fatal")
    parser.add_argument("--dtype", default="fp32", help="encoder dtype, fp32 | fp16 | bf16 (cached tensors keep it)")
    parser.add_argument("--num-frames", type=int, default=None, help="video data: frames per video (as train's --num-frames)")
    parser.add_argument("--fps", type=float, default=None, help="video data: sampling rate of the frames (default: consecutive)")
    parser.add_argument("--video-label", default="overall", help="VideoAlign CSV: the winner by overall | VQ | MQ | TA")


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from diffalign.data import dataset_kind
    from diffalign.models import load_adapter

    dataset_kind(args.dataset)  # a wrong path fails before the model loads
    from diffalign.video import LABELS

    if args.video_label not in LABELS:
        raise DiffalignError(f"--video-label {args.video_label!r} is not valid: choose one of {', '.join(LABELS)}")
    dtype = parse_dtype(args.dtype)
    # cpu=True on a machine without CUDA: this accelerate's launcher does not say so itself, and
    # without it several CPU processes would each believe they are alone (and encode everything).
    state = PartialState(cpu=not torch.cuda.is_available())
    adapter = load_adapter(args.model, device=state.device, dtype=dtype)
    from diffalign.train import model_resolution

    resolution = args.resolution or model_resolution(args.model)
    cfg = DataConfig(dataset=args.dataset, split=args.split, resolution=resolution,
                     max_samples=args.max_samples, strict=args.strict, group_size=args.group_size,
                     num_frames=args.num_frames, fps=args.fps, video_label=args.video_label)
    folder = build_cache(adapter, cfg, args.output_dir, model_id=args.model, pairwise=not args.ranked,
                         batch_size=args.batch_size, shard_size=args.shard_size, device=state.device,
                         rank=state.process_index, world_size=state.num_processes)
    state.wait_for_everyone()
    if state.is_main_process:
        n = len(CachedDataset(folder))
        print(f"cache ready: {folder} ({n} groups)")
    return 0
