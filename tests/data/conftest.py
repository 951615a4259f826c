"""Fixtures for tests/data (defined in data_helpers.py, importable by the tests under that unique name)."""

from data_helpers import *  # noqa: F401,F403
