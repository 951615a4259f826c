"""Every family x objective on tiny random pipelines, through the loop's own building blocks:
the first DPO loss is ln 2 (policy == reference), the loss falls on a fixed batch, gradients
reach only the trainable parameters and every trainable parameter changes."""

import math

import pytest
import torch

from diffalign.config import TrainConfig
from diffalign.models import load_adapter
from diffalign.objectives import get_objective, resolve_hparams
from diffalign.testing import TINY_RESOLUTION, tiny_pipeline
from diffalign.step import compute_loss, draw_step
from diffalign.train import setup_denoiser

CASES = [
    ("sd", {}, ["dpo", "mapo"]),
    ("sd", {"prediction_type": "v_prediction"}, ["dpo"]),
    ("sdxl", {}, ["dpo", "mapo"]),
    ("sd3", {}, ["flow-dpo", "dpo", "mapo"]),
    ("flux", {}, ["flow-dpo", "mapo"]),
    ("pixart", {}, ["dpo", "mapo"]),
]
PARAMS = [(family, kw, method) for family, kw, methods in CASES for method in methods]


def fixed_batch(resolution: int, b: int = 2, k: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "pixels": torch.rand(b, k, 3, resolution, resolution, generator=g) * 2 - 1,
        "prompts": ["a red circle", "two blue squares"][:b],
        "captions": [["a red circle"] * k, ["two blue squares"] * k][:b],
        "scores": torch.tensor([[1.0, 0.0]] * b),
    }


def setup(family, kw, method, full_finetune=False):
    adapter = load_adapter(tiny_pipeline(family, **kw))
    cfg = TrainConfig(method=method, lora_rank=4, full_finetune=full_finetune)
    objective = get_objective(method)
    hparams = resolve_hparams(method, adapter.prediction_type, {})
    params, reference = setup_denoiser(cfg, adapter, objective.NEEDS_REF)
    return adapter, cfg, objective, hparams, params, reference


@pytest.mark.parametrize("family,kw,method", PARAMS, ids=[f"{f}-{m}{'-v' if kw else ''}" for f, kw, m in PARAMS])
def test_training_steps(family, kw, method):
    torch.manual_seed(0)
    adapter, cfg, objective, hparams, params, reference = setup(family, kw, method)
    batch = fixed_batch(TINY_RESOLUTION[family])
    frozen_before = {n: p.detach().clone() for n, p in adapter.denoiser.named_parameters() if not p.requires_grad}
    names = {id(p): n for n, p in adapter.denoiser.named_parameters()}
    trainable_before = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=5e-3)
    losses = []
    for step in range(6):
        generator = torch.Generator().manual_seed(123)  # fixed noise and t: a fixed batch
        loss, metrics = compute_loss(adapter, adapter.denoiser, batch, objective, hparams, reference,
                                   draw_step(adapter, batch, generator, len(batch['prompts'])), "cpu")
        if step == 0 and objective.NEEDS_REF:
            assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0: policy == reference
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            for n, p in adapter.denoiser.named_parameters():
                assert (p.grad is not None) == p.requires_grad, n
            assert all(p.grad is not None for p in params)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for before, p in zip(trainable_before, params):
        if family == "sd3" and "add_q_proj" in names[id(p)]:
            # SD3's last joint block is context_pre_only: its context queries feed only context
            # outputs that the block discards, so a LoRA there can never receive a gradient.
            continue
        assert not torch.equal(before, p.detach()), f"trainable {names[id(p)]} did not change"
    for n, p in adapter.denoiser.named_parameters():
        if n in frozen_before:
            assert torch.equal(frozen_before[n], p.detach()), f"frozen {n} changed"


def test_full_finetune_reference_is_a_frozen_copy():
    adapter, cfg, objective, hparams, params, reference = setup("sd", {}, "dpo", full_finetune=True)
    assert len(params) == len(list(adapter.denoiser.parameters()))
    batch = fixed_batch(32)
    optimizer = torch.optim.SGD(params, lr=1e-2)
    loss, _ = compute_loss(adapter, adapter.denoiser, batch, objective, hparams, reference,
                                   draw_step(adapter, batch, torch.Generator().manual_seed(1), len(batch['prompts'])), "cpu")
    # Two copies of the same weights agree to float rounding; beta = 5000 amplifies 1e-8 to 1e-4.
    assert loss.item() == pytest.approx(math.log(2), abs=1e-3)
    loss.backward()
    optimizer.step()
    loss2, metrics = compute_loss(adapter, adapter.denoiser, batch, objective, hparams, reference,
                                   draw_step(adapter, batch, torch.Generator().manual_seed(1), len(batch['prompts'])), "cpu")
    # The policy moved, the frozen reference did not.
    assert not torch.allclose(metrics["model_err_w"], metrics["ref_err_w"])


def test_one_forward_serves_the_whole_batch():
    adapter, cfg, objective, hparams, params, reference = setup("sd", {}, "mapo")
    calls = []
    hook = adapter.denoiser.register_forward_hook(lambda m, args, kwargs_out: calls.append(args[0].shape[0]) if args else None)
    batch = fixed_batch(32, b=2, k=2)
    compute_loss(adapter, adapter.denoiser, batch, objective, hparams, reference,
                                   draw_step(adapter, batch, torch.Generator().manual_seed(0), len(batch['prompts'])), "cpu")
    hook.remove()
    assert calls == [4]  # MaPO: no reference pass, one policy forward over B*K = 4 images
