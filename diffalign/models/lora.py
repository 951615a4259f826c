"""LoRA, the reference model, LoRA export, and the attention implementation.

- `add_lora(denoiser, rank, alpha)` freezes the denoiser and adds a peft LoRA adapter the way
  diffusers' training scripts do (`denoiser.add_adapter(LoraConfig(...))`), so only the LoRA
  A/B matrices train. B starts at zero: the policy equals the base model at step 0.
- `reference(denoiser)` runs the reference under no_grad: with LoRA, the same network with
  its adapters disabled (no second copy, as in Diffusion-DPO's LoRA scripts); for full
  fine-tuning, a `frozen_copy(denoiser)` made once at start (optionally kept on the CPU and
  moved in only while it runs, as the official SDXL DPO script offloads its reference).
- `save_lora(denoiser, out_dir, family)` asks the family file's `save_lora_weights`: most write
  `pytorch_lora_weights.safetensors` that loads with `pipe.load_lora_weights(out_dir)`. PixArt
  has no diffusers LoRA loader (neither the pipelines nor PixArtTransformer2DModel), so its
  LoRA is written in peft's own format
  (adapter_config.json + adapter_model.safetensors): `load_lora(pipe.transformer, out_dir)`
  loads it in place, `peft.PeftModel.from_pretrained(pipe.transformer, out_dir)` wraps it.
- `set_attention(denoiser, "auto"|"xformers"|"sdpa")` picks the attention kernels and returns
  the name of the one that runs, for the training log.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from diffalign.errors import DiffalignError

if TYPE_CHECKING:
    from torch import nn

# wrapper -> weak reference to the bare module. accelerate's helper walks every submodule
# looking for compiled regions (about 1.5 ms on the tiny UNet), and the reference pass unwraps
# twice a step; a model's wrappers do not change once made, so each is unwrapped once.
_UNWRAPPED: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP/DeepSpeed/torch.compile wrappers (accelerate's helper)."""
    from accelerate.utils import extract_model_from_parallel

    known = _UNWRAPPED.get(model)
    bare = known() if known is not None else None
    if bare is None:
        bare = extract_model_from_parallel(model)
        _UNWRAPPED[model] = weakref.ref(bare)
    return bare


def has_lora(denoiser: nn.Module) -> bool:
    """True when the denoiser carries a peft adapter (added by `add_lora` or loaded)."""
    return bool(lora_layers(_unwrap(denoiser)))


# model -> its LoRA layers. The reference pass switches them off and on every step: walking
# the whole network each time cost about 2 ms a step on the tiny UNet (5% of a cached step).
_LORA_LAYERS: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()


def lora_layers(model: nn.Module) -> list:
    """The peft tuner layers inside `model`, found once (add_lora and load_lora refresh them)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if model not in _LORA_LAYERS:
        _LORA_LAYERS[model] = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    return _LORA_LAYERS[model]


def add_lora(
    denoiser: nn.Module,
    rank: int,
    alpha: float | None = None,
    target_modules: list[str] | None = None,
    dropout: float = 0.0,
    family: str | None = None,
) -> list[torch.nn.Parameter]:
    """Freeze `denoiser` and add a LoRA adapter; return the trainable (LoRA) parameters.

    `alpha` defaults to `rank` (scale 1). `target_modules` defaults to the family's
    `LORA_TARGETS` (diffalign/models/<family>.py); give `family` or `target_modules`. Names match
    a module's full name or its dotted suffix.
    """
    from peft import LoraConfig

    from diffalign.models import FAMILIES, family_module

    if rank < 1:
        raise DiffalignError(f"LoRA rank must be >= 1, got {rank}: pass --lora-rank 8 (or --full-finetune)")
    if target_modules is None:
        if family not in FAMILIES:
            raise DiffalignError(f"no default LoRA targets for family {family!r}: pass target_modules or one of {', '.join(FAMILIES)}")
        target_modules = family_module(family).LORA_TARGETS
    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        lora_dropout=dropout,
        init_lora_weights="gaussian",  # A ~ N(0, 1/r), B = 0, as diffusers' LoRA scripts
        target_modules=list(target_modules),
    )
    denoiser.requires_grad_(False)
    try:
        _inject(denoiser, config)
    except ValueError as exc:  # peft: none of the target modules exists in this network
        raise DiffalignError(f"LoRA target modules {list(target_modules)} do not match {type(denoiser).__name__} ({exc}): fix target_modules") from None
    return [p for p in denoiser.parameters() if p.requires_grad]


def _inject(denoiser: nn.Module, config) -> None:
    """Add the "default" LoRA adapter: diffusers' `add_adapter` where the model has it, else
    peft's injection plus the `peft_config` attribute that peft's state-dict helpers read."""
    from diffusers.loaders.peft import PeftAdapterMixin
    from peft import inject_adapter_in_model

    _LORA_LAYERS.pop(denoiser, None)  # new layers: found again on next use
    if isinstance(denoiser, PeftAdapterMixin):
        denoiser.add_adapter(config)
    else:  # PixArtTransformer2DModel
        inject_adapter_in_model(config, denoiser, adapter_name="default")
        denoiser.peft_config = {"default": config}


def _set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every LoRA layer on or off for the reference pass, for any model.

    Only the switch that peft's forward reads (`disable_adapters`) is flipped. peft's own
    `enable_adapters` also resets `requires_grad` on every adapter weight, which is about 9 ms
    a call on toy-sd's 56 layers (a quarter of a cached DPO step on the CPU); the reference runs
    under no_grad and never changes which adapter trains, so that bookkeeping is not needed."""
    for module in lora_layers(model):
        module.__dict__["_disable_adapters"] = not enabled


def frozen_copy(denoiser: nn.Module, offload: bool = False) -> nn.Module:
    """A frozen deepcopy of `denoiser` to serve as the full fine-tuning reference.

    Make it before training starts (and before `accelerator.prepare`). With `offload=True`
    it lives on the CPU and `reference` moves it to the policy's device only while it runs.
    """
    ref = copy.deepcopy(_unwrap(denoiser)).requires_grad_(False).eval()
    return ref.to("cpu") if offload else ref


@contextlib.contextmanager
def reference(denoiser: nn.Module, ref_model: nn.Module | None = None) -> Iterator[nn.Module]:
    """Context manager yielding the reference network, with gradients off.

    `ref_model` given (full fine-tuning): that frozen copy, moved to the denoiser's device for
    the duration if it was offloaded. Otherwise the denoiser must carry LoRA: its adapters are
    disabled inside the block and re-enabled after, even on error.

        with reference(denoiser) as ref:
            ref_pred = adapter.predict(ref, xt, t, cond)
    """
    policy = _unwrap(denoiser)
    if ref_model is not None:
        device = next(policy.parameters()).device
        home = next(ref_model.parameters()).device
        ref_model.to(device)
        try:
            with torch.no_grad():
                yield ref_model
        finally:
            ref_model.to(home)
        return
    if not has_lora(policy):
        raise DiffalignError("no reference: the denoiser has no LoRA adapter; add_lora(...) or pass ref_model=frozen_copy(denoiser)")
    _set_lora_enabled(policy, False)
    try:
        with torch.no_grad():
            yield policy
    finally:
        _set_lora_enabled(policy, True)


def lora_state_dict(denoiser: nn.Module, diffusers_keys: bool = False) -> dict[str, torch.Tensor]:
    """The LoRA weights as diffusers' training scripts save them: the plain peft state dict, or
    with `diffusers_keys` converted to diffusers' key format (what UNet LoRA loaders read)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(_unwrap(denoiser))
    state = convert_state_dict_to_diffusers(state) if diffusers_keys else state
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_lora(denoiser: nn.Module, out_dir: str | Path, family: str) -> Path:
    """Write the denoiser's LoRA to `out_dir` with the family's saver and return the weights file.

    sd, sdxl, sd3, flux: `pytorch_lora_weights.safetensors`, loaded by
    `pipe.load_lora_weights(out_dir)`; the LoraConfig (rank, alpha, targets) travels in the
    file's metadata, so alpha != rank loads with the right scale. pixart: peft's format,
    loaded by `load_lora(pipe.transformer, out_dir)`.
    """
    from diffalign.models import family_module

    saver = family_module(family).save_lora_weights  # an unknown family fails before anything is written
    model = _unwrap(denoiser)
    if not has_lora(model):
        raise DiffalignError("save_lora: the denoiser has no LoRA adapter; save full weights with save_pretrained instead")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return publish(out, lambda folder: saver(model, folder, model.peft_config["default"].to_dict()))


def publish(out: Path, write) -> Path:
    """Run `write(folder)` into a temporary folder inside `out`, then move what it wrote into
    `out` with the user's umask (safetensors' own atomic save leaves 0600). A failed write
    (a full disk) removes the temporary folder, so `out` never holds half a weights file.
    Returns `write`'s result, moved into `out`."""
    import os
    import shutil

    from diffalign.edges import apply_umask

    tmp = out / f".tmp-weights-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        result = Path(write(tmp))
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                apply_umask(path)
        for entry in sorted(tmp.iterdir()):
            target = out / entry.name
            if target.is_dir() and entry.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / result.relative_to(tmp)


def save_peft_lora(model: nn.Module, out: Path) -> Path:
    """peft's own adapter format: adapter_config.json + adapter_model.safetensors, keys under
    "base_model.model." as PeftModel.save_pretrained writes them."""
    from safetensors.torch import save_file

    model.peft_config["default"].save_pretrained(str(out))
    state = {"base_model.model." + k: v for k, v in lora_state_dict(model).items()}
    save_file(state, str(out / "adapter_model.safetensors"))
    return out / "adapter_model.safetensors"


def load_lora(denoiser: nn.Module, lora_dir: str | Path) -> None:
    """Load a LoRA in peft's format (what `save_lora(..., "pixart")` writes) into `denoiser`,
    in place, keeping the model's class (`peft.PeftModel.from_pretrained` would wrap it)."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(lora_dir)
    if not (folder / "adapter_config.json").is_file() or not (folder / "adapter_model.safetensors").is_file():
        raise DiffalignError(f"no peft LoRA in {folder} (adapter_config.json + adapter_model.safetensors): pass the folder save_lora wrote")
    prefix = "base_model.model."
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
    denoiser.requires_grad_(False)
    _inject(denoiser, LoraConfig.from_pretrained(str(folder)))
    result = set_peft_model_state_dict(denoiser, state, adapter_name="default")
    if result.unexpected_keys:
        raise DiffalignError(f"LoRA in {folder} does not fit {type(denoiser).__name__} ({len(result.unexpected_keys)} unknown keys): load it into the model it was trained on")


def _xformers_imports() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or a build that does not match this torch
        return False
    return True


def _xformers_runtime_hint() -> str:
    # The PyPI xformers wheels (0.0.35) link CUDA 12's runtime (libcudart.so.12). Beside a CUDA 13
    # torch that library is missing, xformers' kernels fail to load and it reports "wasn't built
    # with CUDA support"; CUDA 12's runtime wheel makes them load (checked on an H100, torch 2.11+cu130).
    if (torch.version.cuda or "").split(".")[0] not in ("", "12"):
        return ("; the PyPI xformers wheel needs CUDA 12's runtime beside this CUDA "
                f"{torch.version.cuda} torch: pip install nvidia-cuda-runtime-cu12 and put its "
                "nvidia/cuda_runtime/lib folder on LD_LIBRARY_PATH")
    return ""


def set_attention(denoiser: nn.Module, mode: str = "auto") -> str:
    """Choose the attention kernels; return "xformers" or "sdpa" (the one that runs).

    auto: xformers when the denoiser is on CUDA and xformers imports, else PyTorch SDPA.
    sdpa: diffusers' default processors, which call torch's scaled_dot_product_attention.
    Call it once on a freshly loaded denoiser.
    xformers has no CPU kernels, so asking for it off CUDA is an error.
    """
    if mode not in ("auto", "xformers", "sdpa"):
        raise DiffalignError(f"unknown attention {mode!r}: use auto, xformers or sdpa")
    model = _unwrap(denoiser)
    on_cuda = next(model.parameters()).device.type == "cuda"
    if mode == "auto":
        if not (on_cuda and _xformers_imports()):
            return "sdpa"
        try:
            model.enable_xformers_memory_efficient_attention()
            return "xformers"
        except Exception as exc:  # e.g. a wheel built without CUDA kernels: its probe call fails
            warnings.warn(f"xformers imports but cannot run here ({str(exc).splitlines()[0]}); using PyTorch SDPA"
                          f"{_xformers_runtime_hint()}", stacklevel=2)
            return "sdpa"
    if mode == "xformers":
        if not on_cuda:
            raise DiffalignError("xformers attention needs a CUDA device (it has no CPU kernels): use --attention sdpa or auto")
        if not _xformers_imports():
            raise DiffalignError("xformers is not installed or does not match this torch: pip install 'diffalign[xformers]', or use --attention sdpa")
        try:
            model.enable_xformers_memory_efficient_attention()
        except Exception as exc:
            raise DiffalignError(
                f"xformers cannot run on this GPU/torch ({str(exc).splitlines()[0]}): install a CUDA build matching "
                f"your torch, or use --attention sdpa{_xformers_runtime_hint()}"
            ) from None
        return "xformers"
    # Nothing to switch: a freshly loaded diffusers model already runs SDPA (AttnProcessor2_0,
    # JointAttnProcessor2_0, and the dispatcher's "native" backend for FLUX). Call this once,
    # at setup; switching back from xformers is not supported.
    return "sdpa"
