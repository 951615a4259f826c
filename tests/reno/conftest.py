"""Fixtures for the ReNO tests: the tiny SD pipeline (diffalign.testing) with SD-Turbo's
scheduler, Euler with trailing timestep spacing, as one-step ReNO models ship it."""

import pytest
import torch


def turbo_pipeline():
    from diffusers import EulerDiscreteScheduler

    from diffalign.testing import tiny_pipeline

    pipe = tiny_pipeline("sd")
    pipe.unet.register_to_config(sample_size=16)  # 32-pixel images by default: one-step tests stay fast
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def turbo_sd():
    return turbo_pipeline()


@pytest.fixture(scope="session")
def turbo_sd_float64():
    """The same pipeline in float64, for finite-difference checks of the gradient."""
    return turbo_pipeline().to(torch.float64)
