"""Training objectives, one file each, keyed by their CLI name (`--method`).

Every module has:
    NEEDS_REF: bool             the loop runs the reference forward only when True
    USES_IMAGE_CAPTIONS: bool   each image is conditioned on its own caption (DCPO)
    PREDICTION_TYPES: tuple     the model targets it serves ("epsilon", "v_prediction", "flow")
    default_hparams(prediction_type) -> dict
    loss(err, ref_err, *, scores=None, num_timesteps=1000, **hparams) -> (Tensor[B], metrics)
"""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType

from diffalign.errors import DiffalignError

# CLI name -> module. Literal, so `grep` finds every method.
OBJECTIVES = {
    "dpo": "diffalign.objectives.dpo",
    "mapo": "diffalign.objectives.mapo",
    "flow-dpo": "diffalign.objectives.flow_dpo",
    "sft": "diffalign.objectives.sft",
    "rankdpo": "diffalign.objectives.rankdpo",
    "dcpo": "diffalign.objectives.dcpo",
}


def get_objective(name: str) -> ModuleType:
    if name not in OBJECTIVES:
        raise DiffalignError(f"unknown method {name!r}: choose one of {', '.join(OBJECTIVES)}")
    try:
        return importlib.import_module(OBJECTIVES[name])
    except ModuleNotFoundError as err:
        raise DiffalignError(f"method {name!r} is not available in this install ({err})") from err


def resolve_hparams(name: str, prediction_type: str, overrides: dict) -> dict:
    """The objective's defaults for this model type, updated with the user's values.

    Unknown keys fail here, before any model is loaded.
    """
    module = get_objective(name)
    if prediction_type not in module.PREDICTION_TYPES:
        raise DiffalignError(
            f"method {name!r} does not serve {prediction_type!r} models (it serves "
            f"{', '.join(module.PREDICTION_TYPES)}): pick another --method or --model"
        )
    accepted = [
        p.name for p in inspect.signature(module.loss).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    accepted = [a for a in accepted if a not in ("scores", "num_timesteps")]
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise DiffalignError(
            f"method {name!r} has no option {', '.join(unknown)}: its options are {', '.join(accepted) or 'none'}"
        )
    hparams = module.default_hparams(prediction_type)
    hparams.update({k: v for k, v in overrides.items() if v is not None})
    return hparams
