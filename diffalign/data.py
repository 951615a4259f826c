"""Preference datasets -> groups of K images of one prompt, best first.

A *group* (docs/architecture.md, "Data") is

    {"pixels": (K, 3, R, R) in [-1, 1], "prompt": str, "captions": list[str] (K), "scores": (K,)}

with the images sorted best first (pairs: winner, loser). Two on-disk formats are read:

- the Pick-a-Pic v2 schema (caption, jpg_0, jpg_1 as encoded bytes, label_0, label_1, optional
  caption_0/caption_1) from a hub id, a local parquet file/folder or a `datasets` save_to_disk
  folder; more image columns (jpg_2, label_2, ...) give ranked groups of K > 2;
- a JSONL file of pairs ({"prompt", "chosen", "rejected"}) or ranked lists
  ({"prompt", "images", "scores"}), paths relative to the file.

`build_dataset` returns a map-style `GroupDataset`, or a `StreamingGroups` iterable (datasets
streaming) for sets too large for the disk or memory. See docs/datasets.md.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffalign.errors import DiffalignError


@dataclass
class DataConfig:
    """Where the preference data comes from and how images are prepared."""

    dataset: str = ""
    """A hub id, a local parquet file or folder, a `datasets` save_to_disk folder, or a .jsonl file."""
    split: str = "train"
    """Split to read from a hub id or a save_to_disk DatasetDict (local parquet: all files)."""
    resolution: int = 512
    """Images are resized (shortest side) and cropped to resolution x resolution."""
    center_crop: bool = True
    """Centre crop; False draws one random crop position per group."""
    random_flip: bool = False
    """Flip each group horizontally with probability 0.5 (all K images together)."""
    streaming: bool = False
    """Stream the rows (datasets streaming) instead of loading the table: for sets too large for
    the disk or memory. Each process reads its own share; resume with state_dict/skip."""
    max_samples: int | None = None
    """Use at most this many groups (after dropping ties); None = all."""
    strict: bool = False
    """A corrupt or missing image is fatal (default: the group is skipped, counted, warned about)."""
    drop_ties: bool | None = None
    """Drop groups whose best and worst scores are equal; None = drop them for pairwise objectives."""
    group_size: int | None = None
    """K images per group; None = as in the data. Longer ranked lists keep K images spread evenly
    over the ranking (best and worst included). Pairwise objectives always take K = 2."""
    seed: int = 0
    """Seed of the augmentation draws (and of the streaming shuffle)."""
    shuffle_buffer: int = 1000
    """Streaming only: shuffle buffer size (0 = read in storage order)."""
    caption_column: str = "caption"
    """Pick-a-Pic schema: the prompt column. Per-image captions are <caption_column>_<i>."""
    image_columns: list[str] | None = None
    """Pick-a-Pic schema: one column per image (encoded bytes, an Image feature, or a path);
    None = jpg_0, jpg_1, ... as many as the data has (K > 2 for ranked sets)."""
    label_columns: list[str] | None = None
    """Pick-a-Pic schema: one score per image; None = label_0, label_1, ... (one per image).
    label_1 may be absent for pairs (= 1 - label_0)."""
    num_frames: int | None = None
    """Video data (diffalign.video): frames per video; None = image data."""
    fps: float | None = None
    """Video data: the sampling rate of the frames (None: consecutive frames)."""
    video_label: str = "overall"
    """VideoAlign CSV: the winner by overall | VQ | MQ | TA."""


@dataclass
class _Group:
    """One group before its images are decoded: image refs are bytes, paths, dicts or PIL images."""

    prompt: str
    images: list[Any]
    captions: list[str]
    scores: list[float]
    where: str  # "row 17 of X" / "line 3 of X": names the culprit in messages
    base_dir: Path | None = None  # relative image paths are resolved against this
    own_captions: bool = False  # the data gives per-image captions (else each is the prompt)


class _BadImage(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason  # "missing" | "corrupt"


# ----------------------------------------------------------------------------------------------
# Ordering: best first, ties, group size. Works on scores only, so the map-style datasets can
# filter a million rows by reading the label columns, without decoding a single image.


def select_order(
    scores: list[float], *, pairwise: bool, drop_ties: bool, group_size: int | None, where: str = ""
) -> list[int] | None:
    """Indices of the images to keep, best first, or None when the group is dropped (a tie).

    Sorting is stable, so equal scores keep their order in the data.
    """
    k = len(scores)
    order = sorted(range(k), key=lambda i: -scores[i])
    want = 2 if pairwise else group_size
    if want is not None and k != want:
        if k < want:
            raise DiffalignError(
                f"{where} has {k} images but groups of {want} are needed: "
                f"lower group_size or remove the short lists"
            )
        # Spread the kept images evenly over the ranking (positions rounded half up), best and
        # worst always included.
        picks = [int(j * (k - 1) / (want - 1) + 0.5) for j in range(want)]
        order = [order[p] for p in picks]
    if drop_ties and scores[order[0]] == scores[order[-1]]:
        return None
    return order


def _check_scores(scores: list[Any], where: str) -> list[float]:
    out = []
    for s in scores:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise DiffalignError(f"{where} has a missing or non-finite score ({s!r}): give every image a number")
        out.append(float(s))
    return out


# ----------------------------------------------------------------------------------------------
# Images: decode, then the same resize / crop / flip for every image of a group.


def _open_image(ref: Any, base_dir: Path | None):
    from PIL import Image

    if isinstance(ref, dict):  # a `datasets` Image feature read with decode=False
        ref = ref.get("bytes") or ref.get("path")
    if isinstance(ref, Image.Image):
        return _to_rgb(ref)
    if ref is None or (isinstance(ref, (bytes, bytearray, memoryview)) and len(ref) == 0):
        raise _BadImage("missing", "no image data")
    try:
        if isinstance(ref, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(ref)))
        else:
            path = Path(ref)
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            if not path.is_file():
                raise _BadImage("missing", f"no file {path}")
            img = Image.open(path)
        img.load()  # decode now: truncated files fail here, not later in a worker
        return _to_rgb(img)
    except _BadImage:
        raise
    except Image.UnidentifiedImageError:
        raise _BadImage("corrupt", "not a readable image") from None
    except Exception as err:  # PIL raises many types for truncated or damaged data
        raise _BadImage("corrupt", f"{type(err).__name__}: {err}") from None


def _to_rgb(img):
    """8-bit RGB. 16-bit grey PNGs open as integer images ("I;16", "I") whose values PIL's
    convert("RGB") clips at 255, i.e. nearly all white: scale them to 8 bits first."""
    from PIL import Image

    if img.mode.startswith("I"):
        import numpy as np

        values = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


@dataclass
class Augment:
    """One draw per group: the same flip and crop position for all its images."""

    flip: bool
    crop_y: float  # crop position as a fraction of the free space, so sizes may differ
    crop_x: float


def draw_augment(cfg: DataConfig, generator: torch.Generator) -> Augment:
    # Always draw three numbers, whatever the settings, so the stream of draws is the same.
    u = torch.rand(3, generator=generator).tolist()
    flip = cfg.random_flip and u[0] < 0.5
    if cfg.center_crop:
        return Augment(flip, 0.5, 0.5)
    return Augment(flip, u[1], u[2])


def transform_image(img, resolution: int, aug: Augment) -> torch.Tensor:
    """PIL image -> (3, R, R) float in [-1, 1]: resize shortest side, crop, flip."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    img = TF.resize(img, resolution, interpolation=InterpolationMode.BILINEAR, antialias=True)
    w, h = img.size
    top = int(round(aug.crop_y * (h - resolution)))
    left = int(round(aug.crop_x * (w - resolution)))
    img = TF.crop(img, top, left, resolution, resolution)
    if aug.flip:
        img = TF.hflip(img)
    return TF.to_tensor(img) * 2.0 - 1.0


def load_group(group: _Group, order: list[int], cfg: DataConfig, aug: Augment | None) -> dict:
    """Decode and transform the kept images of a group; aug None = decode only (to skip)."""
    if cfg.num_frames is not None:  # videos: (K, F, 3, R, R), one augment for every frame
        from diffalign.video import load_video_group

        return load_video_group(group, order, cfg, aug)
    pixels = []
    for i in order:
        try:
            img = _open_image(group.images[i], group.base_dir)
        except _BadImage as err:
            err.args = (f"{group.where}, image {i}: {err}",)
            raise
        if aug is not None:
            pixels.append(transform_image(img, cfg.resolution, aug))
    return group_sample(group, order, pixels) if aug is not None else {}


def group_sample(group: _Group, order: list[int], pixels: list[torch.Tensor]) -> dict:
    """One dataset item: the kept images (or videos) of a group in `order`, with its prompt,
    per-image captions and scores."""
    return {
        "pixels": torch.stack(pixels),
        "prompt": group.prompt,
        "captions": [group.captions[i] for i in order],
        "scores": torch.tensor([group.scores[i] for i in order], dtype=torch.float32),
    }


def _augment_seed(*parts: int) -> int:
    # A fixed mix of (seed, epoch, position, ...): reproducible whatever the worker layout.
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h * 1_000_003 + int(p) + 0x632BE5AB) % (1 << 62)
    return h


class SkipCounter:
    """Counts skipped groups by reason and warns, without flooding the log."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.counts = {"missing": 0, "corrupt": 0}  # and "short" once a video with too few frames is met

    def record(self, err: _BadImage) -> None:
        if self.strict:
            raise DiffalignError(f"{err.reason} image at {err}: fix or remove it, or drop --strict to skip such groups")
        self.counts[err.reason] = self.counts.get(err.reason, 0) + 1
        total = sum(self.counts.values())
        if total <= 10 or total % 1000 == 0:
            warnings.warn(
                f"skipped a group with a {'too short video' if err.reason == 'short' else err.reason + ' image'} ({err}); skipped so far: "
                f"{self.counts['missing']} missing, {self.counts['corrupt']} corrupt"
                + (f", {self.counts['short']} too short" if self.counts.get("short") else ""),
                stacklevel=3,
            )

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# ----------------------------------------------------------------------------------------------
# Map-style dataset


class GroupDataset(torch.utils.data.Dataset):
    """Map-style groups. `keep[i] = (source index, order)` is decided up front from the scores.

    A group whose image is missing or corrupt is skipped: item i then returns the next good
    group (wrapping around), so batch shapes stay fixed; the skips are counted in `skipped`.
    Augmentation for item i is seeded by (seed, epoch, i): identical with any worker layout.
    """

    def __init__(self, get_group: Callable[[int], _Group], keep: list[tuple[int, list[int]]], cfg: DataConfig):
        self.get_group = get_group
        self.keep = keep
        self.cfg = cfg
        self.epoch = 0
        self.skipped = SkipCounter(cfg.strict)  # distinct bad groups met by this process (worker)
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.keep)

    def set_epoch(self, epoch: int) -> None:
        """New augmentation draws each epoch (call before iterating)."""
        self.epoch = epoch

    def load(self, index: int, *, augment: bool = True) -> dict:
        """Group `index` exactly (no substitution); raises _BadImage for a bad image."""
        source, order = self.keep[index]
        if augment:
            gen = torch.Generator().manual_seed(_augment_seed(self.cfg.seed, self.epoch, index))
            aug = draw_augment(self.cfg, gen)
        else:  # the deterministic view (centre crop, no flip): what the latent cache stores
            aug = Augment(False, 0.5, 0.5)
        return load_group(self.get_group(source), order, self.cfg, aug)

    def __getitem__(self, index: int) -> dict:
        for step in range(len(self.keep)):
            i = (index + step) % len(self.keep)
            if i in self.bad:  # known bad: neither decoded nor counted again
                continue
            try:
                return self.load(i)
            except _BadImage as err:
                self.bad.add(i)
                self.skipped.record(err)
        raise DiffalignError(f"every group of {self.cfg.dataset!r} has a missing or corrupt image: check the dataset")


# ----------------------------------------------------------------------------------------------
# Sources


def dataset_kind(name: str) -> str:
    """Classify a --dataset value as jsonl, parquet, disk (save_to_disk) or hub; a bad path raises."""
    if not name:
        raise DiffalignError("no dataset given: set --dataset to a hub id, parquet folder, save_to_disk folder or .jsonl")
    path = Path(name)
    if name.endswith(".jsonl"):
        if not path.is_file():
            raise DiffalignError(f"JSONL dataset {name!r} not found: check the path")
        return "jsonl"
    if name.endswith(".csv"):  # VideoAlign's video pairs (diffalign.video)
        if not path.is_file():
            raise DiffalignError(f"CSV dataset {name!r} not found: check the path")
        return "csv"
    if path.is_file():
        if path.suffix == ".parquet":
            return "parquet"
        raise DiffalignError(f"dataset file {name!r} is neither .parquet nor .jsonl (nor a video .csv): convert it or pass a folder")
    if path.is_dir():
        if any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return "disk"
        if any(path.rglob("*.parquet")):
            return "parquet"
        raise DiffalignError(
            f"dataset folder {name!r} holds no parquet files and is not a save_to_disk folder: "
            "point --dataset at parquet files, a save_to_disk folder or a .jsonl file"
        )
    if name.startswith((".", "/", "~")) or path.suffix in (".parquet", ".json", ".csv"):
        raise DiffalignError(f"dataset {name!r} not found: check the path")
    return "hub"


def _parquet_files(name: str) -> list[str]:
    path = Path(name)
    return [str(path)] if path.is_file() else sorted(str(p) for p in path.rglob("*.parquet"))


def _load_hf(cfg: DataConfig, kind: str, streaming: bool):
    """The rows as a `datasets` Dataset (or IterableDataset when streaming)."""
    import datasets

    if kind == "parquet":
        files = _parquet_files(cfg.dataset)
        _check_parquet_rows(cfg.dataset, files)
        return datasets.load_dataset("parquet", data_files=files, split="train", streaming=streaming)
    if kind == "disk":
        ds = datasets.load_from_disk(cfg.dataset)
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise DiffalignError(f"split {cfg.split!r} not in {cfg.dataset!r} (has {sorted(ds)}): set --split")
            ds = ds[cfg.split]
        # Several shards so processes and workers can each read their own.
        return ds.to_iterable_dataset(num_shards=min(64, max(1, len(ds)))) if streaming else ds
    try:
        return datasets.load_dataset(cfg.dataset, split=cfg.split, streaming=streaming)
    except Exception as err:  # offline, unknown id, gated repo...
        raise DiffalignError(
            f"could not load dataset {cfg.dataset!r} from the hub ({type(err).__name__}: {str(err).splitlines()[0][:120]}): "
            "check the id and network, or download it and pass a local parquet or save_to_disk folder"
        ) from None


def _check_parquet_rows(name: str, files: list[str]) -> None:
    """An unreadable or empty parquet, or a folder of files with different columns, fails in one
    line (datasets would raise a long traceback)."""
    import pyarrow.parquet as pq

    rows, columns = 0, {}
    for f in files:
        try:
            meta = pq.read_metadata(f)
        except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ...
            raise DiffalignError(f"{f} is not a readable parquet file ({str(err).splitlines()[0][:120]}): "
                                 "rewrite it, or pass another --dataset") from None
        rows += meta.num_rows
        columns[f] = sorted(meta.schema.to_arrow_schema().names)
    layouts = {tuple(c) for c in columns.values()}
    if len(layouts) > 1:
        first, other = (next(f for f, c in columns.items() if tuple(c) == layout) for layout in list(layouts)[:2])
        raise DiffalignError(f"the parquet files of {name!r} differ in their columns ({Path(first).name} and "
                             f"{Path(other).name}): pass one of the files, or a folder of files with one layout")
    if rows == 0:
        raise DiffalignError(f"dataset {name!r} has no rows: pass a parquet file with preference data "
                             "(docs/datasets.md)")


def describe_groups(dataset: "GroupDataset", limit: int = 256) -> dict:
    """What the first `limit` groups hold, read without decoding an image: whether the data gives
    per-image captions, and whether every group is a tie (all scores equal)."""
    groups = [dataset.get_group(source) for source, _ in dataset.keep[:limit]]
    return {
        "image_captions": any(g.own_captions for g in groups),
        "all_ties": bool(groups) and all(max(g.scores) == min(g.scores) for g in groups),
        "checked": len(groups),
    }


def _pickapic_columns(cfg: DataConfig, columns: list[str]) -> tuple[DataConfig, list[str], list[str]]:
    """(cfg with image/label columns resolved, label columns present, per-image caption columns
    present); error if required columns lack."""
    if cfg.image_columns is None:  # jpg_0, jpg_1, ... while the data has them
        k = 2
        while f"jpg_{k}" in columns:
            k += 1
        cfg = dataclasses.replace(cfg, image_columns=[f"jpg_{i}" for i in range(k)])
    if cfg.label_columns is None:
        cfg = dataclasses.replace(cfg, label_columns=[f"label_{i}" for i in range(len(cfg.image_columns))])
    k = len(cfg.image_columns)
    if k < 2 or len(cfg.label_columns) < k:
        raise DiffalignError(
            f"image_columns {cfg.image_columns} need at least 2 columns and one label column each "
            f"(label_columns {cfg.label_columns}): list them in the same order"
        )
    labels = list(cfg.label_columns[:k])
    required = [cfg.caption_column, *cfg.image_columns]
    # label_1 may be left out of a pair: it is 1 - label_0.
    required += labels[:1] if k == 2 else labels
    missing = [c for c in required if c not in columns]
    if missing:
        raise DiffalignError(
            f"dataset {cfg.dataset!r} lacks column(s) {', '.join(missing)}: the Pick-a-Pic schema needs "
            f"{', '.join(required)} (image columns as encoded bytes); rename the columns or set image_columns/label_columns"
        )
    present_labels = [c for c in labels if c in columns]
    captions = [f"{cfg.caption_column}_{i}" for i in range(k)]
    return cfg, present_labels, [c for c in captions if c in columns]


def _row_scores(cfg: DataConfig, row_labels: list[Any], where: str) -> list[float]:
    scores = _check_scores(row_labels, where)
    if len(cfg.image_columns) == 2 and len(scores) == 1:
        scores.append(1.0 - scores[0])
    return scores


def _row_group(cfg: DataConfig, row: dict, labels: list[str], captions: list[str], where: str, base_dir) -> _Group:
    prompt = str(row[cfg.caption_column] or "")
    per_image = [str(row[c]) if row.get(c) else prompt for c in captions] if captions else []
    return _Group(
        prompt=prompt,
        images=[row[c] for c in cfg.image_columns],
        captions=per_image or [prompt] * len(cfg.image_columns),
        scores=_row_scores(cfg, [row[c] for c in labels], where),
        where=where,
        base_dir=base_dir,
        own_captions=bool(per_image),
    )


def _undecoded(ds):
    """Read Image features as {"bytes", "path"} so a corrupt image is ours to count, not a crash."""
    import datasets

    for name, feature in (ds.features or {}).items():
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(name, datasets.Image(decode=False))
    return ds


def _pickapic_base_dir(cfg: DataConfig, kind: str) -> Path | None:
    if kind in ("parquet", "disk"):
        path = Path(cfg.dataset)
        return path.parent if path.is_file() else path
    return None


def _pickapic_map(cfg: DataConfig, kind: str, pairwise: bool, drop_ties: bool) -> GroupDataset:
    ds = _undecoded(_load_hf(cfg, kind, streaming=False))
    cfg, labels, captions = _pickapic_columns(cfg, ds.column_names)
    ds = ds.select_columns([cfg.caption_column, *cfg.image_columns, *labels, *captions])
    base_dir = _pickapic_base_dir(cfg, kind)
    name = cfg.dataset

    # Decide ties and order from the label columns alone (no image decoding).
    # (Arrow columns: a million labels in ~0.1 s; list(ds[c]) takes half a minute.)
    arrow = ds.with_format("arrow")
    label_values = [arrow[c].to_pylist() for c in labels]
    keep = []
    for row in range(len(ds)):
        where = f"row {row} of {name}"
        scores = _row_scores(cfg, [col[row] for col in label_values], where)
        order = select_order(scores, pairwise=pairwise, drop_ties=drop_ties, group_size=cfg.group_size, where=where)
        if order is not None:
            keep.append((row, order))
    _check_not_empty(keep, cfg, len(ds))

    return GroupDataset(_TableRows(ds, cfg, labels, captions, base_dir), keep[: cfg.max_samples], cfg)


@dataclass
class _TableRows:
    """Row -> _Group of a `datasets` table (a class, not a closure: DataLoader workers pickle it)."""

    ds: Any
    cfg: DataConfig
    labels: list[str]
    captions: list[str]
    base_dir: Path | None

    def __call__(self, row: int) -> _Group:
        where = f"row {row} of {self.cfg.dataset}"
        return _row_group(self.cfg, self.ds[row], self.labels, self.captions, where, self.base_dir)


def _check_not_empty(keep: list, cfg: DataConfig, n_rows: int) -> None:
    if not keep:
        raise DiffalignError(
            f"nothing left in {cfg.dataset!r} after dropping ties ({n_rows} groups read): "
            "use data with a preferred image, or pass --no-drop-ties (YAML drop_ties: false) for an objective that takes ties"
        )


# ----------------------------------------------------------------------------------------------
# JSONL


def parse_jsonl_line(obj: Any, where: str, base_dir: Path) -> _Group:
    """One JSONL object -> _Group: a pair (chosen, rejected) or a ranked list (images, scores)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
        raise DiffalignError(f"{where} needs a JSON object with a string \"prompt\": see docs/datasets.md")
    prompt = obj["prompt"]
    if "images" in obj:
        images = obj["images"]
        if not isinstance(images, list) or len(images) < 2:
            raise DiffalignError(f"{where}: a ranked list needs at least 2 images in \"images\": add images or drop the line")
        scores = obj.get("scores")
        if not isinstance(scores, list) or len(scores) != len(images):
            raise DiffalignError(f"{where}: \"scores\" must be a list with one number per image ({len(images)})")
        scores = _check_scores(scores, where)
        captions = obj.get("captions")
    elif "chosen" in obj and "rejected" in obj:
        images, scores = [obj["chosen"], obj["rejected"]], [1.0, 0.0]
        if "chosen_score" in obj or "rejected_score" in obj:  # per-sample rewards (flow-rwr weights)
            scores = _check_scores([obj.get("chosen_score"), obj.get("rejected_score")], where)
        captions = None
        if "chosen_caption" in obj or "rejected_caption" in obj:
            captions = [obj.get("chosen_caption") or prompt, obj.get("rejected_caption") or prompt]
    else:
        raise DiffalignError(
            f"{where} has neither \"chosen\"/\"rejected\" nor \"images\"/\"scores\": see docs/datasets.md for the format"
        )
    own_captions = captions is not None
    if captions is None:
        captions = [prompt] * len(images)
    if not isinstance(captions, list) or len(captions) != len(images) or not all(isinstance(c, str) for c in captions):
        raise DiffalignError(f"{where}: \"captions\" must be a list of {len(images)} strings, one per image")
    if not all(isinstance(p, str) and p for p in images):
        raise DiffalignError(f"{where}: image paths must be non-empty strings")
    return _Group(prompt, list(images), list(captions), scores, where, base_dir, own_captions)


def _jsonl_lines(path: Path) -> Iterator[tuple[int, _Group]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"line {lineno} of {path}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DiffalignError(f"{where} is not valid JSON ({err.msg}): fix or remove it") from None
            yield lineno, parse_jsonl_line(obj, where, path.parent)


def _jsonl_map(cfg: DataConfig, pairwise: bool, drop_ties: bool) -> GroupDataset:
    return groups_dataset([g for _, g in _jsonl_lines(Path(cfg.dataset))], cfg, pairwise, drop_ties)


def groups_dataset(groups: list, cfg: DataConfig, pairwise: bool, drop_ties: bool) -> GroupDataset:
    """A map-style dataset over groups read whole (a JSONL file, a video CSV): the groups that
    give an order to train on, the first `max_samples` of them."""
    keep = []
    for i, g in enumerate(groups):
        order = select_order(g.scores, pairwise=pairwise, drop_ties=drop_ties, group_size=cfg.group_size, where=g.where)
        if order is not None:
            keep.append((i, order))
    _check_not_empty(keep, cfg, len(groups))
    return GroupDataset(groups.__getitem__, keep[: cfg.max_samples], cfg)


# ----------------------------------------------------------------------------------------------
# Streaming


def process_share() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed when initialised, else the launcher's env."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _worker_share() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class StreamingGroups(torch.utils.data.IterableDataset):
    """Groups read as a stream, this process's share only; one pass over it per epoch.

    Resume: `state_dict()` -> {"epoch", "consumed"} after the loop consumed that many groups of
    this epoch (exact with num_workers=0); `load_state_dict(s)` or `set_epoch(e); skip(n)`
    continues with group n+1. Skipping decodes (without transforming) the skipped groups' images,
    so a corrupt image is judged exactly as in the first pass.
    With DataLoader workers, call `skip(n, batch_size=B)`: the DataLoader takes batches from the
    workers in turn, so each worker skips its share of the n groups. No group is then repeated
    or lost, but a new DataLoader starts with worker 0, so the batches after the resume point
    come in a rotated worker order (bit-exact order needs num_workers=0).
    """

    def __init__(self, rows: Callable[[int, int, int], Iterator[_Group]], cfg: DataConfig, pairwise: bool,
                 drop_ties: bool, rank: int, world_size: int):
        self.rows = rows  # (epoch, worker, num_workers) -> this process's groups (and worker's)
        self.cfg = cfg
        self.pairwise = pairwise
        self.drop_ties = drop_ties
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.consumed = 0
        self._skip = 0
        self._skip_batch: int | None = None
        self.skipped = SkipCounter(cfg.strict)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.consumed = 0

    def skip(self, n: int, batch_size: int | None = None) -> None:
        """Make the next pass start after the first n groups of this process (this epoch)."""
        self._skip, self._skip_batch = n, batch_size

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(int(state["epoch"]))
        self.skip(int(state["consumed"]))

    def _my_skip(self, worker: int, workers: int) -> int:
        if workers == 1 or self._skip == 0:
            return self._skip
        if self._skip_batch is None:
            raise DiffalignError("resuming a stream read by several DataLoader workers needs skip(n, batch_size=B)")
        # Batch j came from worker j % workers: count the full batches worker `worker` delivered.
        batches = self._skip // self._skip_batch
        return max(0, (batches - worker + workers - 1) // workers) * self._skip_batch

    def _limit(self) -> int | None:
        if self.cfg.max_samples is None:
            return None
        return math.ceil(self.cfg.max_samples / self.world_size)

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker_share()
        to_skip = self._my_skip(worker, workers)
        self._skip = 0
        self.consumed = to_skip
        limit = self._limit()
        yielded = 0
        for position, group in enumerate(self.rows(self.epoch, worker, workers)):
            if limit is not None and yielded >= limit // workers + (worker < limit % workers):
                return
            order = select_order(group.scores, pairwise=self.pairwise, drop_ties=self.drop_ties,
                                 group_size=self.cfg.group_size, where=group.where)
            if order is None:
                continue
            seed = _augment_seed(self.cfg.seed, self.epoch, self.rank, worker, position)
            aug = None if to_skip > 0 else draw_augment(self.cfg, torch.Generator().manual_seed(seed))
            try:
                item = load_group(group, order, self.cfg, aug)
            except _BadImage as err:
                if to_skip == 0:  # counted once, in the pass that first met it
                    self.skipped.record(err)
                continue
            yielded += 1
            if to_skip > 0:
                to_skip -= 1
                continue
            self.consumed += 1
            yield item


def _hf_stream_rows(cfg: DataConfig, kind: str, rank: int, world_size: int) -> _HFStream:
    from datasets.distributed import split_dataset_by_node

    ds = _undecoded(_load_hf(cfg, kind, streaming=True))
    columns = list(ds.column_names or next(iter(ds)).keys())
    cfg, labels, captions = _pickapic_columns(cfg, columns)
    ds = ds.select_columns([cfg.caption_column, *cfg.image_columns, *labels, *captions])
    if cfg.shuffle_buffer > 0:
        ds = ds.shuffle(seed=cfg.seed, buffer_size=cfg.shuffle_buffer)
    ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    return _HFStream(ds, cfg, labels, captions, _pickapic_base_dir(cfg, kind), rank)


@dataclass
class _HFStream:
    """This process's rows of a `datasets` stream (a class, not a closure: workers pickle it)."""

    ds: Any
    cfg: DataConfig
    labels: list[str]
    captions: list[str]
    base_dir: Path | None
    rank: int

    def __call__(self, epoch: int, worker: int, workers: int) -> Iterator[_Group]:
        # datasets splits the shards among DataLoader workers itself.
        self.ds.set_epoch(epoch)
        for i, row in enumerate(self.ds):
            where = f"row {i} of {self.cfg.dataset} (rank {self.rank} stream)"
            yield _row_group(self.cfg, row, self.labels, self.captions, where, self.base_dir)


@dataclass
class _JsonlStream:
    """Line i goes to process i % world, then to worker (i // world) % workers, in file order:
    JSONL files are small enough to shuffle map-style; streaming them is for memory."""

    path: Path
    rank: int
    world_size: int

    def __call__(self, epoch: int, worker: int, workers: int) -> Iterator[_Group]:
        for i, (_, group) in enumerate(_jsonl_lines(self.path)):
            if i % self.world_size == self.rank and (i // self.world_size) % workers == worker:
                yield group


# ----------------------------------------------------------------------------------------------
# Public entry points


def build_dataset(cfg: DataConfig, *, pairwise: bool = True, rank: int | None = None,
                  world_size: int | None = None) -> GroupDataset | StreamingGroups:
    """The preference groups of `cfg.dataset`: map-style, or streaming when `cfg.streaming`.

    pairwise: the objective takes winner/loser pairs (dpo, mapo, dcpo...): K = 2, ties dropped
    (unless drop_ties is False), ranked lists reduced to (best, worst). False: K as in the data
    (or group_size) for ranked objectives.
    rank/world_size: this process's share when streaming (default: from torch.distributed or
    the RANK/WORLD_SIZE env that `accelerate launch` sets). Map-style datasets are split by the
    sampler (accelerate's prepared DataLoader) instead.
    """
    if cfg.resolution <= 0:
        raise DiffalignError(f"resolution must be positive (got {cfg.resolution}): set --resolution")
    if pairwise and cfg.group_size not in (None, 2):
        raise DiffalignError(f"a pairwise objective takes groups of 2, not group_size={cfg.group_size}: unset group_size")
    if cfg.group_size is not None and cfg.group_size < 2:
        raise DiffalignError(f"group_size must be at least 2 (got {cfg.group_size})")
    drop_ties = pairwise if cfg.drop_ties is None else cfg.drop_ties
    if cfg.dataset.startswith("~"):
        cfg = dataclasses.replace(cfg, dataset=os.path.expanduser(cfg.dataset))
    kind = dataset_kind(cfg.dataset)
    if kind == "csv":
        from diffalign.video import csv_dataset

        return csv_dataset(cfg, pairwise, drop_ties)
    if not cfg.streaming:
        if kind == "jsonl":
            return _jsonl_map(cfg, pairwise, drop_ties)
        return _pickapic_map(cfg, kind, pairwise, drop_ties)
    default_rank, default_world = process_share()
    rank = default_rank if rank is None else rank
    world_size = default_world if world_size is None else world_size
    if kind == "jsonl":
        rows = _JsonlStream(Path(cfg.dataset), rank, world_size)
    else:
        rows = _hf_stream_rows(cfg, kind, rank, world_size)
    return StreamingGroups(rows, cfg, pairwise, drop_ties, rank, world_size)


# Item key -> batch key; everything else keeps its name.
_BATCH_NAMES = {"prompt": "prompts"}


def _stack(values: list[torch.Tensor], key: str) -> torch.Tensor:
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) > 1:
        raise DiffalignError(
            f"groups in one batch differ in shape for {key!r} ({sorted(shapes)}): "
            "ranked lists of different lengths need group_size set"
        )
    return torch.stack(values)


def collate_groups(items: list[dict]) -> dict:
    """Stack groups: pixels/latents (B, K, ...), prompts list[B], captions list[B][K], scores (B, K).

    Cached groups (diffalign.cache): cond (B, K, ...), prompt_cond (B, ...) stacked by name.
    """
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if torch.is_tensor(values[0]):
            out = _stack(values, key)
        elif isinstance(values[0], dict):  # the latent cache's text embeddings, stacked by name
            out = {k: _stack([v[k] for v in values], f"{key}.{k}") for k in values[0]}
        else:
            out = values
        batch[_BATCH_NAMES.get(key, key)] = out
    return batch
