"""Training objectives, one file each, keyed by their CLI name (`--method`).

Every module has:
    NEEDS_REF: bool             the loop runs the reference forward only when True
    DATA: str                   the data it trains on, one of DATA_KINDS
    PREDICTION_TYPES: tuple     the model targets it serves ("epsilon", "v_prediction", "flow")
    CHOICES: dict               option -> its allowed values (e.g. loss_type)
    POSITIVE: tuple             options that must be > 0 (e.g. beta)
    default_hparams(prediction_type) -> dict
    loss(err, ref_err, *, scores=None, num_timesteps=1000, **hparams) -> (Tensor[B], metrics)

`check_hparams` validates a user's options against CHOICES/POSITIVE and the keyword arguments of
`loss`, so a typo or a bad value fails in one line before any model loads.
"""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType

from diffalign.errors import DiffalignError

# What an objective trains on:
#   pairs            winner/loser pairs (K = 2, ties dropped), every image on the group's prompt
#   ranked           ranked lists of K >= 2 images with their scores, ties kept
#   captioned-pairs  pairs where each image is conditioned on its own caption (caption_0/caption_1)
#   prompts          prompts only: an online method samples and judges its own pairs (diffalign/online.py)
DATA_KINDS = ("pairs", "ranked", "captioned-pairs", "prompts")

# CLI name -> module. Literal, so `grep` finds every method.
OBJECTIVES = {
    "dpo": "diffalign.objectives.dpo",
    "mapo": "diffalign.objectives.mapo",
    "flow-dpo": "diffalign.objectives.flow_dpo",
    "flow-rwr": "diffalign.objectives.flow_rwr",
    "sft": "diffalign.objectives.sft",
    "rankdpo": "diffalign.objectives.rankdpo",
    "dcpo": "diffalign.objectives.dcpo",
    "spo": "diffalign.objectives.spo",
    "grpo": "diffalign.objectives.grpo",
}


def get_objective(name: str) -> ModuleType:
    if name not in OBJECTIVES:
        raise DiffalignError(f"unknown method {name!r}: choose one of {', '.join(OBJECTIVES)}")
    try:
        return importlib.import_module(OBJECTIVES[name])
    except ModuleNotFoundError as err:
        raise DiffalignError(f"method {name!r} is not available in this install ({err})") from err


def hparam_names(module: ModuleType) -> list[str]:
    """The options an objective takes: the keyword-only arguments of its `loss`."""
    params = inspect.signature(module.loss).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("scores", "num_timesteps")]


def check_hparams(name: str, overrides: dict) -> None:
    """Fail in one line on an option the objective does not take or a value it cannot use.

    Runs on the user's values alone, so `diffalign train` calls it before any model loads.
    """
    module = get_objective(name)
    accepted = hparam_names(module)
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise DiffalignError(
            f"method {name!r} has no option {', '.join(unknown)}: its options are {', '.join(accepted) or 'none'}"
        )
    for key, value in overrides.items():
        if value is None:
            continue
        choices = module.CHOICES.get(key)
        if choices is not None and value not in choices:
            raise DiffalignError(f"{name} option {key}={value!r} is not valid: choose one of {', '.join(choices)}")
        if key in module.POSITIVE and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise DiffalignError(f"{name} option {key}={value!r} must be a positive number: e.g. the default, "
                                 f"{_default_text(module, key)}")


def _default_text(module: ModuleType, key: str) -> str:
    defaults = {p: module.default_hparams(p).get(key) for p in module.PREDICTION_TYPES}
    values = sorted({v for v in defaults.values() if v is not None})
    return " / ".join(f"{v:g}" for v in values) if values else "a value > 0"


def resolve_hparams(name: str, prediction_type: str, overrides: dict) -> dict:
    """The objective's defaults for this model type, updated with the user's values.

    Unknown keys and bad values fail here (and in `check_hparams`, before any model loads).
    """
    module = get_objective(name)
    check_hparams(name, overrides)
    if prediction_type not in module.PREDICTION_TYPES:
        raise DiffalignError(
            f"method {name!r} does not serve {prediction_type!r} models (it serves "
            f"{', '.join(module.PREDICTION_TYPES)}): pick another --method or --model"
        )
    hparams = module.default_hparams(prediction_type)
    hparams.update({k: v for k, v in overrides.items() if v is not None})
    return hparams
