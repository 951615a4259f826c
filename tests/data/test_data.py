"""The data layer: Pick-a-Pic schema, JSONL, ordering, ties, augmentation, bad images, streaming."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from helpers import image_bytes, pickapic_rows, write_image, write_jsonl, write_parquet

from diffalign.data import DataConfig, build_dataset, collate_groups
from diffalign.errors import DiffalignError


def as_pixels(data: bytes, flip: bool = False) -> torch.Tensor:
    """Independent reference: an R x R image as (3, R, R) in [-1, 1], optionally mirrored."""
    from PIL import Image, ImageOps

    img = Image.open(io.BytesIO(data)).convert("RGB")
    if flip:
        img = ImageOps.mirror(img)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1) * 2 - 1


def cfg_for(path, **kw) -> DataConfig:
    kw.setdefault("resolution", 8)
    kw.setdefault("random_flip", False)
    return DataConfig(dataset=str(path), **kw)


def test_pickapic_winner_first_ties_dropped(tmp_path):
    rows = pickapic_rows(5, labels=[1.0, 0.0, 0.5, 0.0, 1.0], captions=True, size=(8, 8))
    ds = build_dataset(cfg_for(write_parquet(tmp_path / "p.parquet", rows)))
    assert len(ds) == 4  # the tie (row 2) is gone
    prompts = [ds[i]["prompt"] for i in range(4)]
    assert prompts == ["prompt 0", "prompt 1", "prompt 3", "prompt 4"]
    swapped = ds[1]  # label_0 == 0: jpg_1 won
    assert torch.allclose(swapped["pixels"][0], as_pixels(rows[1]["jpg_1"]), atol=1e-6)
    assert torch.allclose(swapped["pixels"][1], as_pixels(rows[1]["jpg_0"]), atol=1e-6)
    assert swapped["captions"] == ["caption 1 of image 1", "caption 1 of image 0"]
    assert swapped["scores"].tolist() == [1.0, 0.0]
    kept = ds[0]
    assert torch.allclose(kept["pixels"][0], as_pixels(rows[0]["jpg_0"]), atol=1e-6)
    assert kept["captions"] == ["caption 0 of image 0", "caption 0 of image 1"]


def test_ties_kept_without_pairwise_and_captions_default_to_prompt(tmp_path):
    rows = pickapic_rows(3, labels=[1.0, 0.0, 0.5], size=(8, 8))
    ds = build_dataset(cfg_for(write_parquet(tmp_path / "p.parquet", rows)), pairwise=False)
    assert len(ds) == 3
    tie = ds[2]
    assert tie["scores"].tolist() == [0.5, 0.5]
    assert torch.allclose(tie["pixels"][0], as_pixels(rows[2]["jpg_0"]), atol=1e-6)  # data order kept
    assert tie["captions"] == ["prompt 2", "prompt 2"]


def test_only_ties_and_missing_columns_are_clear_errors(tmp_path):
    rows = pickapic_rows(3, labels=[0.5, 0.5, 0.5])
    with pytest.raises(DiffalignError, match="nothing left.*after dropping ties"):
        build_dataset(cfg_for(write_parquet(tmp_path / "ties.parquet", rows)))
    for row in rows:
        del row["label_0"], row["jpg_1"]
    with pytest.raises(DiffalignError, match="lacks column.*jpg_1, label_0.*needs caption, jpg_0, jpg_1, label_0"):
        build_dataset(cfg_for(write_parquet(tmp_path / "cols" / "p.parquet", rows)))


def test_resize_and_centre_crop_match_a_hand_computation(tmp_path):
    from PIL import Image

    rows = pickapic_rows(1, size=(12, 10))
    ds = build_dataset(cfg_for(write_parquet(tmp_path / "p.parquet", rows)))
    img = Image.open(io.BytesIO(rows[0]["jpg_0"])).convert("RGB")
    # shortest side 10 -> 8, so 12 -> int(8 * 12 / 10) = 9; centre crop drops column 0.
    small = img.resize((9, 8), Image.BILINEAR).crop((0, 0, 8, 8))
    buf = io.BytesIO()
    small.save(buf, format="PNG")
    assert torch.allclose(ds[0]["pixels"][0], as_pixels(buf.getvalue()), atol=1e-6)


def test_flip_is_one_draw_per_group(tmp_path):
    rows = pickapic_rows(12, labels=[1.0] * 12, size=(8, 8))
    ds = build_dataset(cfg_for(write_parquet(tmp_path / "p.parquet", rows), random_flip=True))
    flips = []
    for i, row in enumerate(rows):
        pixels = ds[i]["pixels"]
        flipped = torch.allclose(pixels[0], as_pixels(row["jpg_0"], flip=True), atol=1e-6)
        assert flipped or torch.allclose(pixels[0], as_pixels(row["jpg_0"]), atol=1e-6)
        # The loser got exactly the winner's flip.
        assert torch.allclose(pixels[1], as_pixels(row["jpg_1"], flip=flipped), atol=1e-6)
        flips.append(flipped)
    assert 0 < sum(flips) < len(flips)


def test_random_crop_is_shared_within_a_group_and_reproducible(tmp_path):
    same = image_bytes(7, (20, 16))
    rows = [{"caption": f"p{i}", "jpg_0": same, "jpg_1": same, "label_0": 1.0, "label_1": 0.0} for i in range(8)]
    cfg = cfg_for(write_parquet(tmp_path / "p.parquet", rows), center_crop=False, random_flip=True)
    ds = build_dataset(cfg)
    items = [ds[i]["pixels"] for i in range(8)]
    for pixels in items:
        assert torch.equal(pixels[0], pixels[1])
    assert len({p[0].sum().item() for p in items}) > 1  # different draws across groups
    again = build_dataset(cfg)
    assert all(torch.equal(again[i]["pixels"], items[i]) for i in range(8))
    again.set_epoch(1)
    assert any(not torch.equal(again[i]["pixels"], items[i]) for i in range(8))


def test_corrupt_and_missing_images_are_skipped_and_counted(tmp_path):
    rows = pickapic_rows(4, labels=[1.0] * 4, size=(8, 8))
    rows[1]["jpg_1"] = b"this is not an image"
    rows[2]["jpg_0"] = b""
    path = write_parquet(tmp_path / "p.parquet", rows)
    ds = build_dataset(cfg_for(path))
    with pytest.warns(UserWarning, match="skipped a group"):
        prompts = [ds[i]["prompt"] for i in range(len(ds))]
    # Items 1 and 2 fall through to the next good group.
    assert prompts == ["prompt 0", "prompt 3", "prompt 3", "prompt 3"]
    assert ds.skipped.counts == {"missing": 1, "corrupt": 1}  # each bad group counted once
    stream = build_dataset(cfg_for(path, streaming=True, shuffle_buffer=0))
    with pytest.warns(UserWarning):
        assert [g["prompt"] for g in stream] == ["prompt 0", "prompt 3"]
    assert stream.skipped.counts == {"missing": 1, "corrupt": 1}
    strict = build_dataset(cfg_for(path, strict=True))
    with pytest.raises(DiffalignError, match="corrupt image at row 1 of .*image 1"):
        strict[1]


def test_save_to_disk_folder_with_splits_and_k3_columns(tmp_path):
    import datasets

    rows = pickapic_rows(3, size=(8, 8))
    for i, row in enumerate(rows):
        row["jpg_2"], row["label_2"] = image_bytes(100 + i, (8, 8)), 0.25
        row["label_0"], row["label_1"] = 0.1, 0.9
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    cfg = cfg_for(tmp_path / "dd", split="test")  # jpg_0..jpg_2 and label_0..label_2 found by name
    ds = build_dataset(cfg, pairwise=False)
    item = ds[0]
    assert item["scores"].tolist() == pytest.approx([0.9, 0.25, 0.1])
    assert torch.allclose(item["pixels"][1], as_pixels(rows[0]["jpg_2"]), atol=1e-6)
    with pytest.raises(DiffalignError, match="split 'train' not in"):
        build_dataset(cfg_for(tmp_path / "dd"))
    pair = build_dataset(dataclasses.replace(cfg, image_columns=["jpg_0", "jpg_2"], label_columns=["label_0", "label_2"]))
    assert pair[0]["scores"].tolist() == pytest.approx([0.25, 0.1])
    shares = [[g["prompt"] for g in build_dataset(dataclasses.replace(cfg, streaming=True), pairwise=False,
                                                  rank=r, world_size=2)] for r in range(2)]
    assert sorted(shares[0] + shares[1]) == ["prompt 0", "prompt 1", "prompt 2"]


@pytest.mark.parametrize("name, message", [
    ("", "no dataset given"),
    ("missing/data.jsonl", "JSONL dataset .* not found"),
    ("./missing-folder", "not found"),
    ("notes.txt", "neither .parquet nor .jsonl"),
    ("empty-folder", "holds no parquet files"),
])
def test_bad_dataset_paths(tmp_path, monkeypatch, name, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(DiffalignError, match=message):
        build_dataset(DataConfig(dataset=name))


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(DiffalignError, match="could not load dataset 'nobody/no-such-set'.*local parquet"):
        build_dataset(DataConfig(dataset="nobody/no-such-set"))


def test_jsonl_pairs_with_captions(tmp_path):
    a, b = write_image(tmp_path / "img" / "a.png", 1, (8, 8)), write_image(tmp_path / "img" / "b.png", 2, (8, 8))
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "a cat", "chosen": f"img/{a}", "rejected": f"img/{b}", "chosen_caption": "a grey cat"},
        {"prompt": "a dog", "chosen": f"img/{b}", "rejected": f"img/{a}"},
    ])
    ds = build_dataset(cfg_for(path))
    first = ds[0]
    assert torch.allclose(first["pixels"][0], as_pixels((tmp_path / "img" / a).read_bytes()), atol=1e-6)
    assert first["captions"] == ["a grey cat", "a cat"]
    assert first["scores"].tolist() == [1.0, 0.0]
    batch = collate_groups([ds[0], ds[1]])
    assert batch["pixels"].shape == (2, 2, 3, 8, 8)
    assert batch["prompts"] == ["a cat", "a dog"]
    assert batch["captions"][1] == ["a dog", "a dog"]
    assert batch["scores"].shape == (2, 2)


def test_jsonl_ranked_lists_are_sorted_best_first(tmp_path):
    names = [write_image(tmp_path / f"{i}.png", 10 + i, (8, 8)) for i in range(4)]
    path = write_jsonl(tmp_path / "ranked.jsonl", [
        {"prompt": "p", "images": names, "scores": [0.1, 0.9, 0.5, 0.3], "captions": ["c0", "c1", "c2", "c3"]},
    ])
    ranked = build_dataset(cfg_for(path), pairwise=False)[0]
    assert ranked["captions"] == ["c1", "c2", "c3", "c0"]
    assert ranked["scores"].tolist() == pytest.approx([0.9, 0.5, 0.3, 0.1])
    assert torch.allclose(ranked["pixels"][0], as_pixels((tmp_path / names[1]).read_bytes()), atol=1e-6)
    pair = build_dataset(cfg_for(path))[0]  # pairwise: best against worst
    assert pair["captions"] == ["c1", "c0"]
    three = build_dataset(cfg_for(path, group_size=3), pairwise=False)[0]  # ranks 0, 1.5 -> 2, 3
    assert three["captions"] == ["c1", "c3", "c0"]


@pytest.mark.parametrize("line, message", [
    ({"prompt": "p", "images": ["a.png"], "scores": [1.0]}, "at least 2 images"),
    ({"prompt": "p", "images": ["a.png", "b.png"]}, "one number per image"),
    ('{"prompt": "p", "images": ["a.png", "b.png"], "scores": [1.0, NaN]}', "non-finite score"),
    ({"prompt": "p", "images": ["a.png", "b.png"], "scores": [1, 0], "captions": ["x"]}, "list of 2 strings"),
    ({"prompt": "p", "chosen": "a.png"}, "neither"),
    ("{not json", "not valid JSON"),
])
def test_jsonl_bad_lines_name_the_line(tmp_path, line, message):
    good = {"prompt": "ok", "chosen": "a.png", "rejected": "b.png"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(DiffalignError, match=f"line 2 of .*{message}"):
        build_dataset(cfg_for(path))


def test_jsonl_missing_file_is_skipped(tmp_path):
    a = write_image(tmp_path / "a.png", 1, (8, 8))
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "gone", "chosen": a, "rejected": "nope.png"},
        {"prompt": "here", "chosen": a, "rejected": a},
    ])
    ds = build_dataset(cfg_for(path))
    with pytest.warns(UserWarning, match="missing image"):
        assert ds[0]["prompt"] == "here"
    assert ds.skipped.counts["missing"] == 1
    with pytest.raises(DiffalignError, match="missing image at line 1 of .*nope.png"):
        build_dataset(cfg_for(path, strict=True))[0]


def test_collate_refuses_groups_of_different_sizes(tmp_path):
    names = [write_image(tmp_path / f"{i}.png", i, (8, 8)) for i in range(3)]
    path = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "a", "images": names, "scores": [3, 2, 1]},
        {"prompt": "b", "images": names[:2], "scores": [2, 1]},
    ])
    ds = build_dataset(cfg_for(path), pairwise=False)
    with pytest.raises(DiffalignError, match="need group_size"):
        collate_groups([ds[0], ds[1]])


@pytest.mark.parametrize("n_files", [4, 3])  # 4 files: whole shards per rank; 3: row-level split
def test_streaming_shares_are_disjoint_and_complete(tmp_path, n_files):
    for f in range(n_files):
        rows = pickapic_rows(3, labels=[1.0] * 3, size=(8, 8))
        for i, row in enumerate(rows):
            row["caption"] = f"file {f} row {i}"
        write_parquet(tmp_path / "shards" / f"part-{f}.parquet", rows)
    cfg = cfg_for(tmp_path / "shards", streaming=True, shuffle_buffer=4)
    shares = [[g["prompt"] for g in build_dataset(cfg, rank=r, world_size=2)] for r in range(2)]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(f"file {f} row {i}" for f in range(n_files) for i in range(3))
    assert len(shares[0]) + len(shares[1]) == 3 * n_files


def test_streaming_jsonl_shares(tmp_path):
    a = write_image(tmp_path / "a.png", 1, (8, 8))
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": str(i), "chosen": a, "rejected": a} for i in range(7)])
    shares = [[g["prompt"] for g in build_dataset(cfg_for(path, streaming=True), rank=r, world_size=3)]
              for r in range(3)]
    assert sorted(sum(shares, []), key=int) == [str(i) for i in range(7)]
    assert sum(len(s) for s in shares) == 7


def test_streaming_resume_reproduces_the_order(tmp_path):
    rows = pickapic_rows(9, labels=[1.0, 0.0, 0.5] * 3, size=(12, 10))
    rows[4]["jpg_0"] = b"garbage"  # a skipped group before the resume point
    path = write_parquet(tmp_path / "p.parquet", rows)
    cfg = cfg_for(path, streaming=True, shuffle_buffer=4, random_flip=True, center_crop=False)
    with pytest.warns(UserWarning):
        full = list(build_dataset(cfg))
    assert len(full) == 5  # 9 rows, 3 ties, 1 corrupt
    first = build_dataset(cfg)
    it = iter(first)
    with pytest.warns(UserWarning):
        consumed = [next(it) for _ in range(3)]
    state = first.state_dict()
    assert state == {"epoch": 0, "consumed": 3}
    resumed = build_dataset(cfg)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    rest = list(resumed)
    assert [g["prompt"] for g in consumed + rest] == [g["prompt"] for g in full]
    for a, b in zip(consumed + rest, full):
        assert torch.equal(a["pixels"], b["pixels"])  # same crops and flips after the resume
    assert resumed.skipped.total == 0  # the corrupt group was counted in the first pass only
    assert len(rest) == 2


def test_max_samples_counts_groups_after_ties(tmp_path):
    rows = pickapic_rows(9, size=(8, 8))  # labels 1, 0, 0.5, ...: rows 2, 5, 8 are ties
    path = write_parquet(tmp_path / "p.parquet", rows)
    ds = build_dataset(cfg_for(path, max_samples=4))
    assert [ds[i]["prompt"] for i in range(len(ds))] == ["prompt 0", "prompt 1", "prompt 3", "prompt 4"]
    shares = [list(build_dataset(cfg_for(path, streaming=True, max_samples=3), rank=r, world_size=2)) for r in range(2)]
    assert [len(s) for s in shares] == [2, 2]  # ceil(3 / 2) groups per process


def test_datasets_pickle_for_spawned_workers(tmp_path):
    """DataLoader workers started by spawn/forkserver receive the dataset pickled."""
    import pickle

    path = write_parquet(tmp_path / "p.parquet", pickapic_rows(3, labels=[1.0] * 3, size=(8, 8)))
    a = write_image(tmp_path / "a.png", 1, (8, 8))
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x", "chosen": a, "rejected": a}])
    for cfg in (cfg_for(path), cfg_for(jsonl)):
        ds = build_dataset(cfg)
        assert torch.equal(pickle.loads(pickle.dumps(ds))[0]["pixels"], ds[0]["pixels"])
    for cfg in (cfg_for(path, streaming=True, shuffle_buffer=0), cfg_for(jsonl, streaming=True)):
        ds = build_dataset(cfg)
        assert [g["prompt"] for g in pickle.loads(pickle.dumps(ds))] == [g["prompt"] for g in ds]


def test_a_16_bit_png_is_scaled_not_clipped_to_white(tmp_path):
    """PIL's convert("RGB") clips 16-bit grey values at 255; the loader scales them to 8 bits."""
    from PIL import Image

    from diffalign.data import _open_image

    grey = (np.arange(12 * 10).reshape(10, 12) * 500).astype(np.uint16)  # 0 .. 59500
    path = tmp_path / "deep.png"
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(_open_image(str(path), None))
    assert rgb.shape == (10, 12, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    np.testing.assert_array_equal(rgb[..., 0], np.rint(grey / 257.0).astype(np.uint8))


def test_an_empty_parquet_fails_in_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"caption": pa.array([], pa.string()), "label_0": pa.array([], pa.float64())}), path)
    with pytest.raises(DiffalignError, match="has no rows"):
        build_dataset(cfg_for(path))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DiffalignError, match="junk.parquet is not a readable parquet file"):
        build_dataset(cfg_for(tmp_path / "junk.parquet"))


def test_describe_groups_tells_own_captions_and_all_ties(tmp_path):
    from diffalign.data import describe_groups

    plain = build_dataset(cfg_for(write_parquet(tmp_path / "p.parquet", pickapic_rows(4))), pairwise=False)
    assert describe_groups(plain)["image_captions"] is False
    captioned = build_dataset(cfg_for(write_parquet(tmp_path / "c.parquet", pickapic_rows(4, captions=True))))
    assert describe_groups(captioned)["image_captions"] is True
    ties = build_dataset(cfg_for(write_parquet(tmp_path / "t.parquet", pickapic_rows(3, labels=[0.5] * 3))), pairwise=False)
    assert describe_groups(ties)["all_ties"] is True and describe_groups(plain)["all_ties"] is False
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": write_image(tmp_path / "a.png", 0),
                                                "rejected": write_image(tmp_path / "b.png", 1)}])
    assert describe_groups(build_dataset(cfg_for(jsonl)))["image_captions"] is False


def test_a_folder_of_parquet_files_with_two_layouts_fails_in_one_line(tmp_path):
    write_parquet(tmp_path / "d" / "pairs.parquet", pickapic_rows(2))
    write_parquet(tmp_path / "d" / "captions.parquet", pickapic_rows(2, captions=True))
    with pytest.raises(DiffalignError, match="differ in their columns .*pass one of the files") as err:
        build_dataset(cfg_for(tmp_path / "d"))
    assert "\n" not in str(err.value)
