"""Fixtures for tests/rank (defined in rank_helpers.py, importable by the tests under that unique name)."""

from rank_helpers import *  # noqa: F401,F403
