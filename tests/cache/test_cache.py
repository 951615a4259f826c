"""The latent + text-embedding cache: round trip, resume after an interruption, process shares."""

from __future__ import annotations

import pytest
import torch
from helpers import pickapic_rows, write_parquet

from diffalign.cache import CachedDataset, build_cache
from diffalign.data import DataConfig, build_dataset, collate_groups
from diffalign.errors import DiffalignError


class FakeAdapter:
    """The two encoder methods of the adapter contract, deterministic and cheap.

    encode_images: 2x2 average pool then a fixed 3 -> 4 channel mix; encode_prompts: a
    per-string seeded embedding (tokens (N, 3, 5) and pooled (N, 5)).
    """

    def __init__(self, fail_after: int | None = None):
        self.mix = torch.linspace(-1, 1, 12).reshape(4, 3)
        self.image_calls = 0
        self.fail_after = fail_after

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self.image_calls += 1
        if self.fail_after is not None and self.image_calls > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        pooled = torch.nn.functional.avg_pool2d(pixels, 2)
        return torch.einsum("oc,nchw->nohw", self.mix, pooled)

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds = []
        for p in prompts:
            g = torch.Generator().manual_seed(sum((i + 1) * ord(ch) for i, ch in enumerate(p)))
            embeds.append(torch.randn(3, 5, generator=g))
        tokens = torch.stack(embeds)
        return {"prompt_embeds": tokens, "pooled": tokens.mean(1)}


@pytest.fixture
def parquet(tmp_path):
    rows = pickapic_rows(9, captions=True, size=(12, 10))  # labels 1, 0, 0.5, ...: 6 pairs
    return write_parquet(tmp_path / "data" / "p.parquet", rows)


def cfg_for(path, **kw) -> DataConfig:
    return DataConfig(dataset=str(path), resolution=8, **kw)


def test_cached_groups_equal_direct_encoding(tmp_path, parquet):
    adapter = FakeAdapter()
    cfg = cfg_for(parquet, random_flip=True, center_crop=False)  # the cache takes the centre view
    folder = build_cache(adapter, cfg, tmp_path / "cache", model_id="fake", batch_size=3, shard_size=4)
    cached = CachedDataset(folder)
    direct = build_dataset(cfg_for(parquet, random_flip=False, center_crop=True))
    assert len(cached) == len(direct) == 6
    for i in range(len(direct)):
        want, got = direct[i], cached[i]
        assert torch.allclose(got["latents"], adapter.encode_images(want["pixels"]), atol=1e-6)
        assert got["prompt"] == want["prompt"] and got["captions"] == want["captions"]
        assert torch.equal(got["scores"], want["scores"])
    assert torch.equal(cached.empty_cond["prompt_embeds"], adapter.encode_prompts([""])["prompt_embeds"])
    import pickle  # DataLoader workers get it pickled (open shard handles are not carried)

    assert torch.equal(pickle.loads(pickle.dumps(cached))[5]["latents"], cached[5]["latents"])
    batch = collate_groups([cached[0], cached[1]])
    assert batch["latents"].shape == (2, 2, 4, 4, 4)
    assert batch["prompts"] == [cached[0]["prompt"], cached[1]["prompt"]]
    for i, item in enumerate([cached[0], cached[1]]):
        per_image = adapter.encode_prompts(item["captions"])  # each image with its own caption
        prompt = adapter.encode_prompts([item["prompt"]])
        for name in ("prompt_embeds", "pooled"):
            assert torch.equal(batch["cond"][name][i], per_image[name])
            assert torch.equal(batch["prompt_cond"][name][i], prompt[name][0])
    assert batch["cond"]["prompt_embeds"].shape == (2, 2, 3, 5)
    assert torch.equal(cached.empty_cond["pooled"], adapter.encode_prompts([""])["pooled"])


def shard_contents(folder):
    from safetensors import safe_open

    out = {}
    for path in sorted(folder.glob("shard-*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out[path.name] = ({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    return out


def assert_same_shards(a, b):
    assert a.keys() == b.keys()
    for name in a:
        (ta, ma), (tb, mb) = a[name], b[name]
        assert ma == mb and ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_interrupted_build_resumes_to_the_same_cache(tmp_path, parquet):
    cfg = cfg_for(parquet)
    whole = build_cache(FakeAdapter(), cfg, tmp_path / "whole", model_id="fake", batch_size=2, shard_size=2)

    with pytest.raises(KeyboardInterrupt):  # dies inside the second shard
        build_cache(FakeAdapter(fail_after=3), cfg, tmp_path / "resumed", model_id="fake", batch_size=2, shard_size=2)
    folder = tmp_path / "resumed" / whole.name
    assert len(list(folder.glob("shard-*.safetensors"))) == 1  # 2 image calls per shard of 2 pairs
    with pytest.raises(DiffalignError, match="incomplete .1 of 3 shards"):
        CachedDataset(folder)

    adapter = FakeAdapter()
    assert build_cache(adapter, cfg, tmp_path / "resumed", model_id="fake", batch_size=2, shard_size=2) == folder
    assert adapter.image_calls == 4  # only the two missing shards were encoded
    assert not list(folder.glob("*.tmp-*"))
    assert_same_shards(shard_contents(folder), shard_contents(whole))
    assert len(CachedDataset(folder)) == 6


def test_each_process_encodes_its_own_shards(tmp_path, parquet):
    cfg = cfg_for(parquet)
    whole = build_cache(FakeAdapter(), cfg, tmp_path / "one", model_id="fake", shard_size=2)
    root = tmp_path / "two"
    folder = build_cache(FakeAdapter(), cfg, root, model_id="fake", shard_size=2, rank=0, world_size=2)
    assert sorted(p.name for p in folder.glob("shard-*")) == ["shard-00000.safetensors", "shard-00002.safetensors"]
    build_cache(FakeAdapter(), cfg, root, model_id="fake", shard_size=2, rank=1, world_size=2)
    assert_same_shards(shard_contents(folder), shard_contents(whole))


def test_key_bad_images_and_streaming(tmp_path):
    rows = pickapic_rows(3, labels=[1.0] * 3, size=(8, 8))
    rows[1]["jpg_0"] = b"broken"
    path = write_parquet(tmp_path / "p.parquet", rows)
    with pytest.warns(UserWarning) as record:
        a = build_cache(FakeAdapter(), cfg_for(path), tmp_path / "c", model_id="fake")
    assert any("1 groups left out" in str(w.message) for w in record)
    with pytest.warns(UserWarning):
        b = build_cache(FakeAdapter(), DataConfig(dataset=str(path), resolution=4), tmp_path / "c", model_id="fake")
        c = build_cache(FakeAdapter(), cfg_for(path), tmp_path / "c", model_id="other")
    assert len({a, b, c}) == 3  # resolution and model are part of the key
    cached = CachedDataset(a)
    assert [cached[i]["prompt"] for i in range(len(cached))] == ["prompt 0", "prompt 2"]
    with pytest.raises(DiffalignError, match="corrupt image at row 1"):
        build_cache(FakeAdapter(), cfg_for(path, strict=True), tmp_path / "strict", model_id="fake")
    with pytest.raises(DiffalignError, match="map-style"):
        build_cache(FakeAdapter(), cfg_for(path, streaming=True), tmp_path / "s", model_id="fake")


def test_cli_with_a_tiny_sd_pipeline(tmp_path):
    """`diffalign cache` through the real adapter: cached latents and texts equal direct encoding."""
    from diffalign.cli import main
    from diffalign.models import load_adapter
    from diffalign.testing import save_tiny_pipeline

    model = save_tiny_pipeline("sd", tmp_path / "tiny-sd")
    rows = pickapic_rows(4, captions=True, size=(20, 16))
    data = write_parquet(tmp_path / "p.parquet", rows)
    out = tmp_path / "cache"
    args = ["cache", "--model", str(model), "--dataset", str(data), "--output-dir", str(out),
            "--resolution", "16", "--batch-size", "3", "--shard-size", "2"]
    assert main(args) == 0
    (folder,) = out.iterdir()
    # `train --cache-latents --cache-dir CACHE` with the same model, data and resolution (its own
    # flip/seed settings) finds this cache and encodes nothing.
    train_view = DataConfig(dataset=str(data), resolution=16, random_flip=True, seed=3)
    assert build_cache(FakeAdapter(fail_after=0), train_view, out, model_id=str(model)) == folder
    cached = CachedDataset(folder)
    adapter = load_adapter(str(model))
    direct = build_dataset(DataConfig(dataset=str(data), resolution=16, random_flip=False))
    assert len(cached) == len(direct) == 3
    for i in range(3):
        got, want = cached[i], direct[i]
        assert torch.allclose(got["latents"], adapter.encode_images(want["pixels"]), atol=1e-5)
        expected = adapter.encode_prompts(want["captions"])
        assert all(torch.allclose(got["cond"][k], expected[k], atol=1e-6) for k in expected)
        assert got["captions"] == want["captions"] and got["prompt"] == want["prompt"]
