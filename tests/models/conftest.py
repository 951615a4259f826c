"""Fixtures for the model-adapter tests: tiny pipelines saved once per session and loaded
back through `load_adapter(folder)`, the hub-id code path."""

import pytest

from diffalign.testing import TINY_VARIANTS as VARIANTS


@pytest.fixture(scope="session")
def saved_pipelines(tmp_path_factory):
    """variant id -> folder written by save_tiny_pipeline (built lazily, once)."""
    from diffalign.testing import save_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny-pipelines")
    cache = {}

    def get(variant):
        if variant not in cache:
            family, options = VARIANTS[variant]
            cache[variant] = save_tiny_pipeline(family, root / variant, **options)
        return cache[variant]

    return get


@pytest.fixture(scope="session")
def loaded_adapters(saved_pipelines):
    """variant id -> adapter loaded from its saved folder (shared: tests must not modify it)."""
    from diffalign.models import load_adapter

    cache = {}

    def get(variant):
        if variant not in cache:
            # a folder saved without T5 loads the way SD3 users drop T5
            kwargs = {"text_encoder_3": None, "tokenizer_3": None} if variant == "sd3-no-t5" else None
            cache[variant] = load_adapter(saved_pipelines(variant), from_pretrained_kwargs=kwargs)
        return cache[variant]

    return get
