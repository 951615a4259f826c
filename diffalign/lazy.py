"""Modules imported on first use.

`import torch` costs about two seconds; a command that gets a bad argument should say so at
once. Modules on the path from `diffalign train ...` to the config check (train.py, the
objectives) name torch through `lazy("torch")`: the name is there at import, torch itself loads
when code first reads an attribute of it (`torch.tensor`, `F.logsigmoid`), i.e. when training
starts. Everything else imports torch as usual.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class LazyModule(types.ModuleType):
    """Stands for the module `name`; every attribute read goes to the real module, imported then."""

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self.__name__), attribute)

    def __dir__(self) -> list[str]:
        return dir(importlib.import_module(self.__name__))

    def __repr__(self) -> str:
        return f"<lazy module {self.__name__!r}>"


def lazy(name: str) -> Any:
    """The module `name` when it is already imported, else a `LazyModule` that imports it on use."""
    return sys.modules.get(name) or LazyModule(name)
