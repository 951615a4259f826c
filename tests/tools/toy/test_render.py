"""The toy world's renderer: deterministic, faithful to the prompt, split cleanly."""

import random

import numpy as np

from tools.toy.render import (
    ATTRIBUTES, BACKGROUNDS, COLOURS, IMAGE_SIZE, Scene, all_scenes, paraphrase, parse_prompt, perturb, render,
    split_prompts,
)


def test_same_seed_same_pixels_and_different_seed_differs():
    scene = Scene(2, "small", "red", "circle", "left", "gray")
    a, b = np.asarray(render(scene, 3)), np.asarray(render(scene, 3))
    assert a.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, np.asarray(render(scene, 4)))


def test_prompt_reads_like_the_scene_and_parses_back():
    scene = Scene(2, "small", "red", "circle", "left", "blue" if "blue" in BACKGROUNDS else "gray")
    assert scene.prompt == f"two small red circles on the left on a {scene.background} background"
    assert Scene(1, "large", "green", "square", "top", "black").prompt == "one large green square at the top on a black background"
    for s in all_scenes()[::97]:
        assert parse_prompt(s.prompt) == s


def test_pixels_follow_colour_position_and_size():
    # the shape colour appears in the named half only, and large shapes cover more pixels
    def shape_pixels(scene):
        img = np.asarray(render(scene, 0)).astype(int)
        target = np.array(COLOURS[scene.colour])
        return (np.abs(img - target).sum(-1) < 90)

    left = shape_pixels(Scene(1, "large", "red", "square", "left", "white"))
    assert left[:, : IMAGE_SIZE // 2].sum() > 20 and left[:, IMAGE_SIZE // 2 :].sum() == 0
    bottom = shape_pixels(Scene(3, "small", "blue", "circle", "bottom", "white"))
    assert bottom[IMAGE_SIZE // 2 :].sum() > 20 and bottom[: IMAGE_SIZE // 2].sum() == 0
    small = shape_pixels(Scene(1, "small", "green", "circle", "right", "black")).sum()
    large = shape_pixels(Scene(1, "large", "green", "circle", "right", "black")).sum()
    assert large > 2 * small


def count_blobs(mask: np.ndarray) -> int:
    """4-connected components, by flood fill."""
    seen = np.zeros_like(mask, dtype=bool)
    blobs = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        blobs += 1
        stack = [(y, x)]
        while stack:
            i, j = stack.pop()
            if 0 <= i < mask.shape[0] and 0 <= j < mask.shape[1] and mask[i, j] and not seen[i, j]:
                seen[i, j] = True
                stack += [(i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)]
    return blobs


def test_count_is_the_number_of_blobs():
    for count in (1, 2, 3):
        for shape in ("circle", "square", "triangle"):
            img = np.asarray(render(Scene(count, "small", "yellow", shape, "top", "black"), 5)).astype(int)
            mask = np.abs(img - np.array(COLOURS["yellow"])).sum(-1) < 90
            assert count_blobs(mask) == count


def test_split_is_disjoint_fixed_and_covers_every_value():
    train, heldout = split_prompts()
    assert len(train) + len(heldout) == len(all_scenes()) == 1080
    assert not set(train) & set(heldout)
    assert split_prompts() == (train, heldout)
    for attribute in ATTRIBUTES:
        assert {getattr(s, a) for s in heldout for a in [attribute]} <= {getattr(s, attribute) for s in train}


def test_perturb_changes_exactly_one_attribute():
    rng = random.Random(0)
    scene = Scene(3, "large", "purple", "triangle", "bottom", "white")
    for _ in range(50):
        other = perturb(scene, rng)
        assert sum(getattr(other, a) != getattr(scene, a) for a in ATTRIBUTES) == 1
    assert perturb(scene, rng, "count").count != 3


def test_paraphrase_rewords_the_prompt_with_its_own_words_only():
    # meaning kept: the same words in another order, each rewrite a different order, and no two
    # scenes share a paraphrase (so a paraphrase still names exactly one scene)
    scene = Scene(1, "small", "red", "circle", "left", "gray")
    assert paraphrase(scene, random.Random(0), 3) == "on the left one red small circle on a gray background"
    seen = {}
    for s in all_scenes():
        texts = {paraphrase(s, random.Random(k), 1) for k in range(20)}
        assert len(texts) == 3 and s.prompt not in texts
        for text in texts:
            assert sorted(text.split()) == sorted(s.prompt.split())
            assert seen.setdefault(text, s) == s
