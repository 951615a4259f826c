"""The Wan family on tiny random pipelines: video latents through the likelihood core, Flow-DPO,
Flow-RWR and RankDPO steps, Wan 2.2's experts, the LoRA file in WanPipeline, the latent cache
and a `diffalign train` run on a tiny mp4 CSV."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diffalign import elbo
from diffalign.config import TrainConfig
from diffalign.errors import DiffalignError
from diffalign.models import load_adapter
from diffalign.models.lora import add_lora, save_lora
from diffalign.models.wan import LOW_NOISE_WEIGHTS, TINY_NUM_FRAMES, TINY_RESOLUTION, WanExperts, load_lora_weights
from diffalign.objectives import get_objective, resolve_hparams
from diffalign.sampler import generate
from diffalign.step import compute_loss, draw_step
from diffalign.testing import tiny_pipeline, tiny_pixels
from diffalign.train import setup_denoiser

F, R = TINY_NUM_FRAMES, TINY_RESOLUTION
PROMPTS = ["a red cube rolls left", "two blue spheres"]


def wan(two_experts=False, expert="auto", seed=0):
    adapter = load_adapter(tiny_pipeline("wan", seed=seed, two_experts=two_experts))
    adapter.set_expert(expert)
    return adapter


def video_batch(b=2, k=2, scores=None):
    g = torch.Generator().manual_seed(0)
    return {
        "pixels": torch.rand(b, k, F, 3, R, R, generator=g) * 2 - 1,  # (B, K, F, 3, H, W)
        "prompts": PROMPTS[:b],
        "captions": [[p] * k for p in PROMPTS[:b]],
        "scores": torch.tensor([[1.0, 0.0]] * b) if scores is None else scores,
    }


def test_encode_decode_by_hand():
    adapter = wan()
    pixels = tiny_pixels("wan", 1, torch.Generator().manual_seed(1))
    latents = adapter.encode_images(pixels)
    assert latents.shape == (1, 16, (F - 1) // 4 + 1, R // 8, R // 8)
    vae = adapter.pipe.vae
    with torch.no_grad():
        mean = vae.encode(pixels.permute(0, 2, 1, 3, 4)).latent_dist.mean
    mu = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(latents, (mean - mu) / std)
    with torch.no_grad():
        video = adapter.decode_latents(latents)
        expected = (vae.decode(latents * std + mu).sample.permute(0, 2, 1, 3, 4) / 2 + 0.5).clamp(0, 1)
    assert video.shape == pixels.shape
    torch.testing.assert_close(video, expected)
    with pytest.raises(DiffalignError, match="takes 1 \\+ 4k frames"):
        adapter.encode_images(pixels[:, :4])
    with pytest.raises(DiffalignError, match="Wan encodes videos"):
        adapter.encode_images(pixels[:, 0])
    assert adapter.latent_shape(16, 32, num_frames=9) == (16, 3, 2, 4)
    with pytest.raises(DiffalignError, match="multiples of 16"):
        adapter.latent_shape(24, 32, num_frames=9)


def test_group_shares_one_noise_and_t_across_frames_and_videos():
    """The core noises a group's K videos with its one (C, F', h, w) draw and one sigma."""
    adapter = wan()
    latents = torch.randn(2, 3, 16, 2, 2, 2)  # (B, K, C, F', h, w)
    noise, t = elbo.draw_noise_and_timesteps(adapter, latents.shape[2:], 2, torch.Generator().manual_seed(0))
    assert noise.shape == (2, 16, 2, 2, 2) and t.shape == (2,)
    seen = []
    original = adapter.predict
    adapter.predict = lambda denoiser, xt, tt, cond: seen.append((xt, tt)) or torch.zeros_like(xt)
    err = elbo.denoising_errors(adapter, adapter.denoiser, latents, {"prompt_embeds": torch.zeros(6, 4, 32)}, noise, t)
    adapter.predict = original
    xt, tt = seen[0]
    assert torch.equal(tt, t.repeat_interleave(3))
    x0 = latents.flatten(0, 1)
    implied_noise = (xt - (1 - tt.view(-1, 1, 1, 1, 1)) * x0) / tt.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(implied_noise, noise.repeat_interleave(3, dim=0), atol=1e-4, rtol=1e-4)
    # err: mean over C, F', h, w of (0 - (noise - x0))^2
    expected = (noise.repeat_interleave(3, dim=0) - x0).pow(2).mean(dim=(1, 2, 3, 4)).view(2, 3)
    torch.testing.assert_close(err, expected)


CASES = [
    ("wan2.1", False, "auto", "flow-dpo"),
    ("wan2.1", False, "auto", "flow-rwr"),
    ("wan2.1", False, "auto", "rankdpo"),
    ("wan2.2-both", True, "both", "flow-dpo"),
    ("wan2.2-high", True, "high", "flow-dpo"),
    ("wan2.2-low", True, "low", "flow-dpo"),
]


@pytest.mark.parametrize("name,two,expert,method", CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_training_steps_on_video_groups(name, two, expert, method):
    torch.manual_seed(0)
    adapter = wan(two, expert)
    objective = get_objective(method)
    hparams = resolve_hparams(method, "flow", {})
    params, reference = setup_denoiser(TrainConfig(method=method, lora_rank=4), adapter, objective.NEEDS_REF)
    k = 3 if method == "rankdpo" else 2
    scores = torch.tensor([[1.0, 0.5, 0.0]] * 2) if k == 3 else torch.tensor([[1.0, 0.0], [0.8, 0.3]])
    batch = video_batch(k=k, scores=scores)
    pipe = adapter.pipe
    modules = [pipe.transformer] + ([pipe.transformer_2] if two else [])
    frozen = {(i, n): p.detach().clone() for i, m in enumerate(modules) for n, p in m.named_parameters() if not p.requires_grad}
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=5e-3)
    for step in range(4):
        draws = draw_step(adapter, batch, torch.Generator().manual_seed(7), 2)
        assert draws.noise.shape == (2, 16, (F - 1) // 4 + 1, R // 8, R // 8)
        low, high = adapter.sigma_range
        assert bool(((draws.t >= low) & (draws.t <= high)).all())
        if expert == "both":  # one group for each expert (the draw rarely reaches sigma >= 0.875)
            draws.t = torch.tensor([0.95, 0.3])
        loss, metrics = compute_loss(adapter, adapter.denoiser, batch, objective, hparams, reference, draws, "cpu")
        if step == 0 and method == "flow-dpo":
            assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0: policy == reference
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            for n, p in adapter.denoiser.named_parameters():
                assert (p.grad is not None) == p.requires_grad, n
        optimizer.step()
    names = [n for n, p in adapter.denoiser.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    for n, b, p in zip(names, before, params):
        assert not torch.equal(b, p.detach()), f"LoRA weight {n} did not change"
    for (i, n), p in frozen.items():
        assert torch.equal(p, dict(modules[i].named_parameters())[n].detach()), f"frozen {n} changed"
    if expert in ("high", "low"):  # the other expert has no LoRA at all
        other = pipe.transformer_2 if expert == "high" else pipe.transformer
        assert not any("lora_" in n for n, _ in other.named_parameters())


def test_expert_ranges_and_choices():
    high, low, both = wan(True, "high"), wan(True, "low"), wan(True)
    assert high.sigma_range == (0.875, 1.0) and high.denoiser is high.pipe.transformer
    assert low.sigma_range == (0.0, 0.875) and low.denoiser is low.pipe.transformer_2
    assert both.expert == "both" and isinstance(both.denoiser, WanExperts)
    t = elbo.draw_timesteps(high, 1000, torch.Generator().manual_seed(0))
    assert 0.875 <= t.min() and t.max() < 1
    t = elbo.draw_timesteps(low, 1000, torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 0.875
    with pytest.raises(DiffalignError, match="needs a two-expert model"):
        wan(False, "high")
    from diffalign.config import EXPERTS
    from diffalign.models.wan import EXPERTS as WAN_EXPERTS

    assert EXPERTS == WAN_EXPERTS


def test_sampling_routes_steps_to_the_experts_as_the_pipeline():
    pipe = tiny_pipeline("wan", two_experts=True)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    hooks = [m.register_forward_hook(lambda mod, a, out, name=name: calls.append(name)) for name, m in
             (("high", pipe.transformer), ("low", pipe.transformer_2))]
    settings = dict(num_inference_steps=4, guidance_scale=1.0, height=R, width=R, num_frames=F)
    with torch.no_grad():
        expected = pipe(prompt=PROMPTS, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], output_type="pt",
                        **settings).frames
    by_pipe, calls[:] = list(calls), []
    videos = generate(pipe, PROMPTS, seeds=[1, 2], **settings)
    for h in hooks:
        h.remove()
    assert by_pipe == calls and "high" in calls and "low" in calls
    torch.testing.assert_close(videos, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(DiffalignError, match="for video models"):
        generate(tiny_pipeline("sd3"), PROMPTS[:1], seeds=[0], num_frames=5, num_inference_steps=1)


def test_per_token_timesteps_sample_as_the_pipeline():
    """Wan 2.2 TI2V's `expand_timesteps`: one timestep per latent token, as the pipeline feeds it."""
    pipe = tiny_pipeline("wan", expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    settings = dict(num_inference_steps=2, guidance_scale=3.0, height=R, width=2 * R, num_frames=F)
    with torch.no_grad():
        expected = pipe(prompt=PROMPTS, generator=[torch.Generator().manual_seed(s) for s in (5, 6)], output_type="pt",
                        **settings).frames
    torch.testing.assert_close(generate(pipe, PROMPTS, seeds=[5, 6], **settings), expected, rtol=1e-5, atol=1e-5)


def _perturb(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("two,expert", [(False, "auto"), (True, "both"), (True, "low")])
def test_saved_lora_loads_into_the_pipeline_and_changes_the_frames(two, expert, tmp_path):
    settings = dict(num_inference_steps=2, guidance_scale=3.0, height=R, width=R, num_frames=F)
    base = generate(wan(two).pipe, PROMPTS, seeds=[3, 4], **settings)
    adapter = wan(two, expert)
    params = add_lora(adapter.denoiser, rank=4, alpha=8, family="wan")
    _perturb(params)
    trained = generate(adapter.pipe, PROMPTS, seeds=[3, 4], **settings)
    path = save_lora(adapter.denoiser, tmp_path / "lora", "wan")
    assert path.is_file() and (path.name == LOW_NOISE_WEIGHTS) == (expert == "low")
    assert (tmp_path / "lora" / LOW_NOISE_WEIGHTS).is_file() == (expert in ("both", "low"))
    fresh = tiny_pipeline("wan", two_experts=two)
    if expert == "auto":
        fresh.load_lora_weights(str(tmp_path / "lora"))  # what a Wan 2.1 user types
    else:
        load_lora_weights(fresh, tmp_path / "lora")
    fresh.set_progress_bar_config(disable=True)
    loaded = generate(fresh, PROMPTS, seeds=[3, 4], **settings)
    assert (loaded - base).abs().max() > 1e-3  # the LoRA changes the frames
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-4)


def _write_videos(folder: Path, n: int = 4):
    from diffalign.video import write_video

    rng = np.random.default_rng(0)
    for i in range(n):
        write_video(folder / f"v{i}.mp4", rng.integers(0, 256, (12, 20, 20, 3), dtype=np.uint8), fps=8)
    with open(folder / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path_A", "path_B", "prompt", "VQ", "MQ", "TA", "fps_A", "num_frames_A", "fps_B", "num_frames_B"])
        writer.writerow(["v0.mp4", "v1.mp4", PROMPTS[0], "A", "A", "B", 8, 12, 8, 12])
        writer.writerow(["v2.mp4", "v3.mp4", PROMPTS[1], "B", "B", "same", 8, 12, 8, 12])
        writer.writerow(["v1.mp4", "v3.mp4", "a cat", "A", "B", "same", 8, 12, 8, 12])  # a tie: dropped
    return folder / "pairs.csv"


def test_latent_cache_holds_video_latents(tmp_path):
    from diffalign.cache import CachedDataset, build_cache
    from diffalign.data import DataConfig, build_dataset

    table = _write_videos(tmp_path / "data")
    adapter = wan()
    cfg = DataConfig(dataset=str(table), resolution=R, num_frames=F)
    folder = build_cache(adapter, cfg, tmp_path / "cache", model_id="tiny-wan")
    cached = CachedDataset(folder)
    assert len(cached) == 2
    item = cached[0]
    assert item["latents"].shape == (2, 16, (F - 1) // 4 + 1, R // 8, R // 8)
    pixels = build_dataset(cfg).load(0, augment=False)["pixels"]
    torch.testing.assert_close(item["latents"], adapter.encode_images(pixels))
    other = build_cache(adapter, DataConfig(dataset=str(table), resolution=R, num_frames=9), tmp_path / "cache",
                        model_id="tiny-wan")
    assert other != folder and len(CachedDataset(other)) == 2  # the frame count is part of the key
    assert CachedDataset(other)[0]["latents"].shape[2] == 3  # 9 frames: 3 latent frames


def test_cli_trains_flow_dpo_on_a_tiny_mp4_csv(tmp_path, capsys):
    from diffalign.cli import main
    from diffalign.testing import save_tiny_pipeline

    table = _write_videos(tmp_path / "data")
    model = save_tiny_pipeline("wan", tmp_path / "tiny-wan")
    out = tmp_path / "run"
    argv = ["train", "--method", "flow-dpo", "--model", str(model), "--dataset", str(table), "--output-dir", str(out),
            "--resolution", str(R), "--num-frames", str(F), "--fps", "8", "--batch-size", "2", "--max-steps", "2",
            "--lr", "1e-3", "--lora-rank", "4", "--checkpoint-every", "0"]
    assert main(argv) == 0, capsys.readouterr().err
    weights = out / "pytorch_lora_weights.safetensors"
    assert weights.is_file()
    pipe = tiny_pipeline("wan")
    pipe.load_lora_weights(str(out))
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and '"loss": 0.693147' in rows[0]
