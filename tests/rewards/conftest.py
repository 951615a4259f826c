"""Fixtures for tests/rewards (defined in rewards_helpers.py, importable by the tests under that unique name)."""

from rewards_helpers import *  # noqa: F401,F403
