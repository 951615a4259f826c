"""Rewards inside diffusers pipelines (installed as `diffalign.pipelines`).

    images, scores = generate_and_score(pipe, "a cat", "pickscore", num_inference_steps=4)
    best = best_of_n(pipe, "a cat", reward, n=8, seed=0)
    tracker = RewardTrajectoryCallback(reward, "a cat")
    with tracker.attached(pipe):
        pipe("a cat", callback_on_step_end=tracker, output_type="pt")

See docs/pipelines.md.
"""

from diffalign.pipelines.generate import BestOfN, best_of_n, generate_and_score, output_pixels
from diffalign.pipelines.trajectory import RewardTrajectoryCallback, decode_latents, predicted_x0

__all__ = ["BestOfN", "best_of_n", "generate_and_score", "output_pixels", "RewardTrajectoryCallback",
           "decode_latents", "predicted_x0"]
