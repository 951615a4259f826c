"""Where the shipped assets and recipes live, for editable and regular installs alike.

`assets/` and `configs/` sit at the top of the repository but are installed as the
`diffalign.assets` and `diffalign.configs` packages (see pyproject.toml), so the same lookup
works from a clone, an editable install and a wheel.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def assets_dir() -> Path:
    return Path(str(resources.files("diffalign.assets")))


def configs_dir() -> Path:
    return Path(str(resources.files("diffalign.configs")))


def asset(name: str) -> Path:
    """Path of a shipped asset, e.g. asset("toy-sd")."""
    return assets_dir() / name
