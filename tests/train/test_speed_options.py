"""The speed options reach the model and the optimiser: channels_last, torch.compile, fused
AdamW (CUDA only), TF32 (Ampere+ only); the prompt memo and the DataLoader worker choice."""

import math
from types import SimpleNamespace

import pytest
import torch

from diffalign.config import TrainConfig
from diffalign.models import load_adapter
from diffalign.objectives import get_objective, resolve_hparams
from diffalign.testing import tiny_pipeline
from diffalign.step import PromptMemo, compute_loss, draw_step, encode_texts, remember_prompts
from diffalign.train import (AUTO_WORKERS_MIN_BATCHES, build_optimizer, loader_workers, set_tf32, setup_denoiser,
                             use_fused_adamw)


def batch(b: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"pixels": torch.rand(b, 2, 3, 32, 32, generator=g) * 2 - 1, "prompts": ["a red circle", "two blue squares"][:b],
            "captions": [["a red circle"] * 2, ["two blue squares"] * 2][:b], "scores": torch.tensor([[1.0, 0.0]] * b)}


def train_steps(cfg: TrainConfig, steps: int = 3):
    torch.manual_seed(0)
    adapter = load_adapter(tiny_pipeline("sd"))
    objective = get_objective("dpo")
    params, reference = setup_denoiser(cfg, adapter, objective.NEEDS_REF)
    hparams = resolve_hparams("dpo", adapter.prediction_type, {})
    optimizer = build_optimizer(cfg, params)
    before = [p.detach().clone() for p in params]
    data = batch()
    losses = []
    for step in range(steps):
        draws = draw_step(adapter, data, torch.Generator().manual_seed(step), 2)
        loss, _ = compute_loss(adapter, adapter.denoiser, data, objective, hparams, reference, draws, "cpu")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    changed = any(not torch.equal(a, p) for a, p in zip(before, params))
    return adapter, optimizer, losses, changed


def test_channels_last_reaches_the_unet_weights_and_trains():
    adapter, _, losses, changed = train_steps(TrainConfig(lora_rank=4, lr=1e-3, channels_last=True))
    convs = [m.weight for m in adapter.denoiser.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert any(not w.is_contiguous() for w in convs)  # 3x3 kernels: no longer in the default layout
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5) and changed
    plain = load_adapter(tiny_pipeline("sd"))
    setup_denoiser(TrainConfig(lora_rank=4), plain, True)
    assert all(m.weight.is_contiguous() for m in plain.denoiser.modules() if isinstance(m, torch.nn.Conv2d))


def test_compile_compiles_the_denoiser_in_place_and_a_step_still_trains(monkeypatch):
    calls = []
    real = torch.nn.Module.compile

    def eager_compile(self, *args, **kwargs):  # the eager backend: the same wrapping, no C++ build in a unit test
        calls.append(type(self).__name__)
        return real(self, *args, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", eager_compile)
    adapter, _, losses, changed = train_steps(TrainConfig(lora_rank=4, lr=1e-3, compile=True), steps=2)
    assert calls == ["UNet2DConditionModel"] and adapter.denoiser._compiled_call_impl is not None
    # Names stay as they were (checkpoints and LoRA files are unchanged), and the step trains.
    assert not any(n.startswith("_orig_mod") for n, _ in adapter.denoiser.named_parameters())
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5) and changed
    plain = load_adapter(tiny_pipeline("sd"))
    setup_denoiser(TrainConfig(lora_rank=4), plain, True)
    assert plain.denoiser._compiled_call_impl is None


def test_fused_adamw_is_asked_for_on_one_cuda_or_cpu_device():
    on_cuda = [SimpleNamespace(device=torch.device("cuda", 0))] * 2
    on_cpu = [torch.nn.Parameter(torch.zeros(2))]
    assert use_fused_adamw(TrainConfig(), on_cuda) and use_fused_adamw(TrainConfig(), on_cpu)
    assert not use_fused_adamw(TrainConfig(fused_optimizer=False), on_cuda)
    assert not use_fused_adamw(TrainConfig(), on_cpu + on_cuda)
    assert not use_fused_adamw(TrainConfig(), [])


def test_fused_adamw_on_the_cpu_steps_as_the_plain_loop():
    torch.manual_seed(0)
    start = [torch.randn(8, 4), torch.randn(4, 8), torch.randn(16)]
    grads = [[torch.randn_like(w) for w in start] for _ in range(5)]
    weights = {}
    for fused in (True, False):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        optimizer = build_optimizer(TrainConfig(lr=1e-2, weight_decay=1e-2, fused_optimizer=fused), params)
        assert bool(optimizer.defaults.get("fused")) == fused
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            optimizer.step()
        weights[fused] = params
    for a, b, w in zip(weights[True], weights[False], start):
        assert not torch.equal(a, w)  # it moved
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_tf32_only_on_an_ampere_gpu(monkeypatch):
    precision, conv = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        assert not set_tf32(TrainConfig(tf32=True), "cpu") and torch.get_float32_matmul_precision() == "highest"
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
        assert not set_tf32(TrainConfig(tf32=True), "cuda")
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
        assert not set_tf32(TrainConfig(tf32=False), "cuda") and torch.get_float32_matmul_precision() == "highest"
        torch.backends.cudnn.allow_tf32 = False
        assert set_tf32(TrainConfig(tf32=True), "cuda")
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.allow_tf32 = conv


def test_prompt_memo_encodes_each_text_once_and_alone():
    adapter = load_adapter(tiny_pipeline("sd"))
    seen = []
    real = adapter.encode_prompts

    def counting(prompts):
        seen.append(list(prompts))
        return real(prompts)

    memo = PromptMemo(counting)
    adapter.encode_prompts = memo
    first = encode_texts(adapter, ["a", "b", "a", ""])
    again = encode_texts(adapter, ["b", "c", "a"])
    assert seen == [["a"], ["b"], [""], ["c"]]  # each new text alone, then never again
    assert torch.equal(again["encoder_hidden_states"][0], first["encoder_hidden_states"][1])
    alone = real(["c"])["encoder_hidden_states"][0]
    assert torch.equal(again["encoder_hidden_states"][1], alone)  # a text's encoding does not depend on its batch
    small = PromptMemo(real, max_bytes=memo.bytes // 4)  # room for one text: the others are encoded each time
    small(["a", "b"])
    assert list(small.table) == ["a"]


def test_prompt_memo_is_on_only_when_the_data_repeats():
    data = list(range(100))
    for cfg, on in ((TrainConfig(max_steps=10, batch_size=8), False), (TrainConfig(max_steps=20, batch_size=8), True),
                    (TrainConfig(max_steps=20, batch_size=8, cache_latents=True), False)):
        adapter = SimpleNamespace(encode_prompts=lambda prompts: {})
        assert remember_prompts(cfg, adapter, data, processes=1) is on
        assert isinstance(adapter.encode_prompts, PromptMemo) is on
    assert remember_prompts(TrainConfig(max_steps=7, batch_size=8), SimpleNamespace(encode_prompts=None), data, 2)


def test_loader_workers_default(monkeypatch):
    cpu = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    many = AUTO_WORKERS_MIN_BATCHES
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(2)), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert loader_workers(TrainConfig(), many, cpu) == 1  # a core the training leaves idle decodes
    assert loader_workers(TrainConfig(), many - 1, cpu) == 0  # a short epoch: not worth starting a worker
    assert loader_workers(TrainConfig(cache_latents=True), many, cpu) == 0
    assert loader_workers(TrainConfig(num_workers=3), 1, cpu) == 3  # the user's choice stands
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert loader_workers(TrainConfig(), many, cpu) == 0  # torch's threads use every core
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert loader_workers(TrainConfig(), many, SimpleNamespace(num_processes=1, device=torch.device("cuda"))) == 4
