"""LoRA, reference model, LoRA export/import and attention selection."""

import pytest
import torch

from diffalign import elbo
from diffalign.errors import DiffalignError
from diffalign.models import load_adapter
from diffalign.models.lora import add_lora, frozen_copy, has_lora, load_lora, lora_layers, reference, save_lora, set_attention
from diffalign.testing import TINY_VARIANTS, tiny_pixels

# Each family's first variant (the LoRA code path does not depend on the other options).
FAMILY_VARIANTS = {}
for _name, (_family, _options) in TINY_VARIANTS.items():
    if _family not in {family for family, _ in FAMILY_VARIANTS.values()}:
        FAMILY_VARIANTS[_name] = (_family, _options)


def _fresh(variant):
    from diffalign.testing import tiny_pipeline

    family, options = TINY_VARIANTS[variant]
    return load_adapter(tiny_pipeline(family, **options))


def _batch(adapter, n=2):
    gen = torch.Generator().manual_seed(0)
    x0 = adapter.encode_images(tiny_pixels(adapter.family, n, gen))  # images, or videos for a video family
    t = elbo.draw_timesteps(adapter, n, gen)
    xt = elbo.add_noise(adapter, x0, torch.randn(x0.shape, generator=gen), t)
    return xt, t, adapter.encode_prompts(["a red cube", "two blue spheres"][:n])


def _perturb_lora_b(denoiser, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


@pytest.mark.parametrize("variant", FAMILY_VARIANTS)
def test_lora_trains_only_lora_and_reference_is_the_base(variant):
    adapter = _fresh(variant)
    xt, t, cond = _batch(adapter)
    with torch.no_grad():
        base = adapter.predict(adapter.denoiser, xt, t, cond)
    n_before = sum(p.numel() for p in adapter.denoiser.parameters())
    trainable = add_lora(adapter.denoiser, rank=4, alpha=8, family=adapter.family)

    names = [n for n, p in adapter.denoiser.named_parameters() if p.requires_grad]
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    assert len(trainable) == len(names)
    assert sum(p.numel() for p in adapter.denoiser.parameters()) > n_before
    # B = 0 at init: policy == base, reference == base
    policy = adapter.predict(adapter.denoiser, xt, t, cond)
    torch.testing.assert_close(policy, base)
    with reference(adapter.denoiser) as ref:
        torch.testing.assert_close(adapter.predict(ref, xt, t, cond), base)

    # gradients reach the LoRA parameters, and only them
    policy.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in trainable)
    assert all(p.grad is None for p in adapter.denoiser.parameters() if not p.requires_grad)

    _perturb_lora_b(adapter.denoiser)
    with torch.no_grad():
        moved = adapter.predict(adapter.denoiser, xt, t, cond)
    assert not torch.allclose(moved, base, atol=1e-4)
    with reference(adapter.denoiser) as ref:
        ref_pred = adapter.predict(ref, xt, t, cond)
        assert not ref_pred.requires_grad
    torch.testing.assert_close(ref_pred, base)
    # adapters are back on after the block, and the same weights still train
    with torch.no_grad():
        torch.testing.assert_close(adapter.predict(adapter.denoiser, xt, t, cond), moved)
    assert [n for n, p in adapter.denoiser.named_parameters() if p.requires_grad] == names


@pytest.mark.parametrize("variant", FAMILY_VARIANTS)
def test_save_lora_loads_back_into_diffusers(variant, tmp_path):
    family, options = TINY_VARIANTS[variant]
    adapter = _fresh(variant)
    xt, t, cond = _batch(adapter)
    add_lora(adapter.denoiser, rank=4, alpha=8, family=family)  # alpha != rank: the scale must survive
    _perturb_lora_b(adapter.denoiser)
    with torch.no_grad():
        trained = adapter.predict(adapter.denoiser, xt, t, cond)
    path = save_lora(adapter.denoiser, tmp_path / "lora", family)
    assert path.is_file()

    fresh = _fresh(variant)  # same seed: the same base weights
    if family == "pixart":  # no diffusers loader: peft's format, in place or wrapped by PeftModel
        from peft import PeftModel

        wrapped = PeftModel.from_pretrained(_fresh(variant).denoiser, str(tmp_path / "lora"))
        with torch.no_grad():
            torch.testing.assert_close(fresh.predict(wrapped, xt, t, cond), trained, atol=1e-5, rtol=1e-4)
        load_lora(fresh.pipe.transformer, tmp_path / "lora")
    else:
        fresh.pipe.load_lora_weights(str(tmp_path / "lora"))
    assert has_lora(fresh.denoiser)
    with torch.no_grad():
        torch.testing.assert_close(fresh.predict(fresh.denoiser, xt, t, cond), trained, atol=1e-5, rtol=1e-4)


def test_full_finetune_reference_is_a_frozen_offloadable_copy():
    adapter = _fresh("sd-eps")
    xt, t, cond = _batch(adapter)
    ref_model = frozen_copy(adapter.denoiser, offload=True)
    assert not any(p.requires_grad for p in ref_model.parameters())
    with torch.no_grad():
        base = adapter.predict(adapter.denoiser, xt, t, cond)
        for p in adapter.denoiser.parameters():  # a "training step" on the policy
            p.add_(0.05)
        moved = adapter.predict(adapter.denoiser, xt, t, cond)
    assert not torch.allclose(moved, base, atol=1e-4)
    with reference(adapter.denoiser, ref_model) as ref:
        torch.testing.assert_close(adapter.predict(ref, xt, t, cond), base)
    assert next(ref_model.parameters()).device.type == "cpu"


def test_reference_without_lora_or_copy_is_an_error():
    adapter = _fresh("sd-eps")
    with pytest.raises(DiffalignError, match="no LoRA adapter"):
        with reference(adapter.denoiser):
            pass


def test_reference_of_a_wrapped_denoiser_is_the_bare_one_unwrapped_once(monkeypatch):
    import accelerate.utils

    adapter = _fresh("sd-eps")
    add_lora(adapter.denoiser, rank=4, family="sd")
    _perturb_lora_b(adapter.denoiser)
    wrapped = torch.nn.DataParallel(adapter.denoiser)  # what accelerate unwraps, as DDP, on the CPU
    real = accelerate.utils.extract_model_from_parallel
    calls = []
    monkeypatch.setattr(accelerate.utils, "extract_model_from_parallel", lambda m: calls.append(m) or real(m))
    for _ in range(3):
        with reference(wrapped) as ref:
            assert ref is adapter.denoiser
            assert all(layer.disable_adapters for layer in lora_layers(ref))
        assert not any(layer.disable_adapters for layer in lora_layers(adapter.denoiser))
    assert calls == [wrapped, adapter.denoiser]  # each module is unwrapped once, not at every step
    with reference(torch.nn.DataParallel(adapter.denoiser)) as ref:  # a new wrapper is unwrapped too
        assert ref is adapter.denoiser and len(calls) == 3


def test_bad_lora_targets_are_clear_errors():
    adapter = _fresh("sd-eps")
    with pytest.raises(DiffalignError, match="do not match"):
        add_lora(adapter.denoiser, rank=4, target_modules=["no_such_layer"])
    with pytest.raises(DiffalignError, match="rank must be >= 1"):
        add_lora(adapter.denoiser, rank=0, family="sd")


def test_attention_selection_on_cpu():
    adapter = _fresh("sd-eps")
    assert set_attention(adapter.denoiser, "auto") == "sdpa"
    assert set_attention(adapter.denoiser, "sdpa") == "sdpa"
    with pytest.raises(DiffalignError, match="xformers attention needs a CUDA device"):
        set_attention(adapter.denoiser, "xformers")
    with pytest.raises(DiffalignError, match="unknown attention"):
        set_attention(adapter.denoiser, "flash")


@pytest.mark.parametrize("cuda, names_fix", [("13.0", True), ("12.8", False), (None, False)])
def test_xformers_failure_names_the_cuda12_runtime_only_beside_another_cuda(monkeypatch, cuda, names_fix):
    from diffalign.models import lora

    monkeypatch.setattr(torch.version, "cuda", cuda)
    hint = lora._xformers_runtime_hint()
    assert ("nvidia-cuda-runtime-cu12" in hint and "13.0" in hint) if names_fix else hint == ""
