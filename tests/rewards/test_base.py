"""rewards/base.py: torch preprocessing against torchvision, weight resolution, safe loading."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from diffalign.errors import DiffalignError
from diffalign.rewards import base


@pytest.mark.parametrize("shape", [(37, 91), (120, 64), (300, 300), (16, 16)])
def test_resize_crop_and_pad_match_torchvision(shape):
    x = torch.rand(2, 3, *shape, generator=torch.Generator().manual_seed(0))
    crop = base.center_crop(base.resize_shortest_side(x, 24), 24)
    expected = TF.center_crop(TF.resize(x, 24, InterpolationMode.BICUBIC, antialias=True), 24)
    torch.testing.assert_close(crop, expected, atol=1e-6, rtol=0)
    padded = base.resize_longest_side_and_pad(x, 24)
    h, w = shape
    new = [round(h * 24 / max(h, w)), round(w * 24 / max(h, w))]
    ref = TF.resize(x, new, InterpolationMode.BICUBIC, antialias=True)
    ph, pw = 24 - new[0], 24 - new[1]
    ref = TF.pad(ref, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
    torch.testing.assert_close(padded, ref, atol=1e-6, rtol=0)
    assert padded.shape[-2:] == (24, 24)


def test_normalize_and_gradient():
    x = torch.rand(1, 3, 40, 30, requires_grad=True)
    y = base.clip_pad_transform(16)(x)
    mean = torch.tensor(base.OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(base.OPENAI_CLIP_STD).view(3, 1, 1)
    # Padded columns are zeros before normalisation: -mean/std after, as in hpsv2.
    torch.testing.assert_close(y[0, :, :, 0], (-mean / std).view(3, 1).expand(3, 16))
    y.sum().backward()
    assert x.grad.abs().sum() > 0


def test_resolve_weights(tmp_path, monkeypatch):
    (tmp_path / "a.pt").write_bytes(b"x")
    assert base.resolve_weights(tmp_path, ["a.pt"]) == [tmp_path / "a.pt"]
    assert base.resolve_weights(tmp_path / "a.pt", "whatever.pt") == [tmp_path / "a.pt"]
    with pytest.raises(DiffalignError, match=r"b.pt not found in .*place the file\(s\) there; use --path"):
        base.resolve_weights(tmp_path, ["a.pt", "b.pt"], "use --path")
    with pytest.raises(DiffalignError, match="does not exist"):
        base.resolve_weights(tmp_path / "missing", "a.pt")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DiffalignError, match=r"a.pt from hub repo 'someone/absent' unavailable \(not in the HF cache"):
        base.resolve_weights("someone/absent", "a.pt")


class Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_load_checkpoint_is_weights_only(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "ok.pt")
    assert base.load_checkpoint(tmp_path / "ok.pt")["state_dict"]["w"].tolist() == [1.0, 1.0]
    torch.save({"state_dict": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(DiffalignError, match="weights-only"):
        base.load_checkpoint(tmp_path / "evil.pt")


def test_strict_loading_names_the_keys():
    module = torch.nn.Linear(2, 3)
    base.load_state_dict_strict(module, {"weight": torch.zeros(3, 2), "bias": torch.ones(3)}, "ok.pt")
    assert module.bias.tolist() == [1.0, 1.0, 1.0]
    bad = {"weight": torch.zeros(2, 2), "extra": torch.zeros(1)}
    with pytest.raises(DiffalignError, match=r"missing: bias; unexpected: extra; wrong shape: weight \(2, 2\) vs \(3, 2\)"):
        base.load_state_dict_strict(module, bad, "bad.pt")


def test_tensor_to_pil_rounds_and_load_pil_keeps_the_mode(tmp_path):
    """exact=True's conversion rounds as diffusers' numpy_to_pil; files keep their mode (the
    originals convert inside their own transforms)."""
    import numpy as np
    from PIL import Image

    x = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0], x[1, 0, 0] = 1.2, -0.1  # out of range: clamped
    array = np.asarray(base.tensor_to_pil(x))
    assert array.shape == (5, 7, 3) and array.dtype == np.uint8
    assert (array == (x.clamp(0, 1) * 255).round().permute(1, 2, 0).numpy().astype(np.uint8)).all()
    Image.fromarray(array).convert("P").save(tmp_path / "p.png")
    assert base.load_pil(tmp_path / "p.png").mode == "P"
    (tmp_path / "v.mp4").write_bytes(b"x")
    with pytest.raises(DiffalignError, match="is a video, not an image: score it with videoreward"):
        base.load_pil(tmp_path / "v.mp4")
