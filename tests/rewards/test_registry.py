"""Registry, user rewards, combine, and the input checks every reward shares."""

from __future__ import annotations

import pytest
import torch

from diffalign import rewards
from diffalign.errors import DiffalignError
from diffalign.rewards import CombinedReward, combine, load_reward, register_reward

from helpers import TINY_OPEN_CLIP, random_pil


def brightness(images, prompts):
    """A user reward: mean pixel value, (B,)."""
    return images.mean(dim=(1, 2, 3))


def redness(images, prompts):
    return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))


class ConstantReward(torch.nn.Module):
    """A user reward class with the builder signature."""

    def __init__(self, value: float):
        super().__init__()
        self.name = "constant"
        self.value = torch.nn.Parameter(torch.tensor(value))

    @classmethod
    def from_pretrained(cls, path=None, device=None, dtype=None, value: float = 1.0):
        return cls(value)

    def score(self, images, prompts):
        return self.value.expand(images.shape[0]) * 1.0


@pytest.fixture(scope="module")
def hps(hps_checkpoint):
    return load_reward("hpsv2.1", path=str(hps_checkpoint), architecture=TINY_OPEN_CLIP)


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(rewards, "REWARDS", dict(rewards.REWARDS))
    return rewards.REWARDS


def test_builtin_names_are_registered():
    expected = {"hpsv2", "hpsv2.1", "pickscore", "imagereward", "vpscore", "clip", "videoreward", "toy-reward", "toy-judge"}
    assert expected <= set(rewards.REWARDS)


def test_unknown_reward_lists_valid_names():
    with pytest.raises(DiffalignError, match="unknown reward 'pickscor'.*hpsv2.1.*pickscore"):
        load_reward("pickscor")


def test_user_function_and_class(registry):
    register_reward("brightness", brightness)
    register_reward("constant", ConstantReward)
    images = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(load_reward("brightness").score(images, ["a", "b"]), images.mean(dim=(1, 2, 3)))
    constant = load_reward("constant", value=3.0)
    assert not constant.training and not constant.value.requires_grad  # frozen by load_reward
    assert constant.score(images, "a").tolist() == [3.0, 3.0]
    with pytest.raises(DiffalignError, match="already registered"):
        register_reward("brightness", redness)
    with pytest.raises(DiffalignError, match="takes no path or options"):
        load_reward("brightness", path="x")


def test_user_function_takes_pil_and_paths(registry, tmp_path):
    register_reward("brightness", brightness)
    pil = random_pil(16, 16, 0)
    pil.save(tmp_path / "a.png")
    reward = load_reward("brightness")
    from_path = reward.score([str(tmp_path / "a.png")], ["x"])
    from_pil = reward.score([pil], ["x"])
    expected = torch.tensor(list(pil.getdata()), dtype=torch.float32).mean() / 255
    torch.testing.assert_close(from_path, from_pil)
    torch.testing.assert_close(from_pil, expected[None], atol=1e-6, rtol=0)


def test_combine_weights_parts_and_normalisation():
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    prompts = ["p"] * 4
    combined = combine({brightness: 2.0, redness: -0.5})
    assert isinstance(combined, CombinedReward)
    total, parts = combined(images, prompts)
    b, r = brightness(images, prompts), redness(images, prompts)
    torch.testing.assert_close(parts["brightness"], b)
    torch.testing.assert_close(total, 2.0 * b - 0.5 * r)
    total.sum().backward()
    assert images.grad.abs().sum() > 0

    z = combine({brightness: 1.0, redness: 1.0}, normalize="zscore").score(images.detach(), prompts)
    standard = lambda x: (x - x.mean()) / (x.std(unbiased=False) + 1e-6)
    torch.testing.assert_close(z, standard(b.detach()) + standard(r.detach()))
    fixed = combine({brightness: 1.0}, normalize={"brightness": (0.5, 0.25)}).score(images.detach(), prompts)
    torch.testing.assert_close(fixed, (b.detach() - 0.5) / 0.25)
    with pytest.raises(DiffalignError, match="at least 2 images"):
        combine({brightness: 1.0}, normalize="zscore").score(images[:1].detach(), prompts[:1])
    with pytest.raises(DiffalignError, match="unknown normalize"):
        combine({brightness: 1.0}, normalize="minmax")


def test_combine_loads_names_with_paths(hps_checkpoint):
    combined = combine({"hpsv2.1": 2.0, brightness: 10.0}, paths={"hpsv2.1": str(hps_checkpoint)},
                       options={"hpsv2.1": {"architecture": TINY_OPEN_CLIP}})
    hps = load_reward("hpsv2.1", path=str(hps_checkpoint), architecture=TINY_OPEN_CLIP)
    images, prompts = torch.rand(2, 3, 32, 32), ["a", "b"]
    with torch.no_grad():
        total, parts = combined(images, prompts)
        torch.testing.assert_close(parts["hpsv2.1"], hps.score(images, prompts))
    torch.testing.assert_close(total, 2.0 * parts["hpsv2.1"] + 10.0 * parts["brightness"])
    assert set(parts) == {"hpsv2.1", "brightness"} and combined.name == "hpsv2.1+brightness"


@pytest.mark.parametrize(
    "images, prompts, message",
    [
        (torch.rand(3, 8, 8), ["a"], "add a batch dimension"),
        (torch.rand(2, 1, 8, 8), ["a", "b"], r"expected \(B, 3, H, W\)"),
        (torch.rand(2, 3, 8, 8) * 2 - 1, ["a", "b"], r"\(x \+ 1\) / 2"),
        (torch.rand(2, 3, 8, 8) * 255, ["a", "b"], "divide"),
        (torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8), ["a", "b"], "float"),
        (torch.rand(0, 3, 8, 8), [], "empty batch"),
        ([], [], "empty list"),
        (torch.rand(2, 3, 8, 8), ["a", "b", "c"], "3 prompts for 2 images"),
        (torch.rand(2, 3, 8, 8), ["a", 3], "prompts must be strings"),
        (["/nonexistent/x.png"], ["a"], "not found"),
        ([42], ["a"], "type int"),
    ],
)
def test_bad_inputs_raise_clear_errors(hps, images, prompts, message):
    with pytest.raises(DiffalignError, match=message):
        hps.score(images, prompts)


def test_corrupt_image_file(tmp_path, hps):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DiffalignError, match="corrupt"):
        hps.score([str(tmp_path / "bad.png")], ["a"])


def test_toy_rewards_load_through_pickscore(hf_clip_folder):
    judge = load_reward("toy-judge", path=str(hf_clip_folder))
    pick = load_reward("pickscore", path=str(hf_clip_folder))
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(judge.score(images, ["a", "b"]), pick.score(images, ["a", "b"]))
    assert judge.name == "toy-judge"


def test_missing_toy_asset_names_the_build_command(monkeypatch, tmp_path):
    import diffalign.paths

    monkeypatch.setattr(diffalign.paths, "assets_dir", lambda: tmp_path)
    with pytest.raises(DiffalignError, match="python -m tools.toy build --only toy-judge"):
        load_reward("toy-judge")
