"""Maintainer tools that live beside the package and are not installed: run them from a clone,
at the repo root (`python -m tools.toy build`)."""
