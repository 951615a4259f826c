"""Pictures a person reads: image sheets (tiles in rows and columns, titles, captions, marks), eval's
grid.png, label's samples.png and the validation sheets, checked on their pixels."""

import json
from collections import deque

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.plots import BORDER, MARKS, PAD, TILE, Tile, image_sheet

GREEN, RED = MARKS["chosen"], MARKS["rejected"]


def solid(colour, size=32):
    return torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1).expand(3, size, size).contiguous()


def box_of(pixels, colour):
    """(left, top, right, bottom) of every pixel of exactly `colour`, or None."""
    ys, xs = np.nonzero((pixels == np.array(colour, dtype=np.uint8)).all(-1))
    return (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) if len(xs) else None


def frames(pixels, colour, min_side=TILE):
    """Bounding boxes of the connected regions of exactly `colour` at least `min_side` wide: the frames."""
    mask = (pixels == np.array(colour, dtype=np.uint8)).all(-1)
    seen = np.zeros_like(mask)
    found = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        queue, seen[y, x], box = deque([(y, x)]), True, [x, y, x, y]
        while queue:
            cy, cx = queue.popleft()
            box = [min(box[0], cx), min(box[1], cy), max(box[2], cx), max(box[3], cy)]
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if box[2] - box[0] + 1 >= min_side:
            found.append((box[0], box[1], box[2] + 1, box[3] + 1))
    return sorted(found, key=lambda b: (b[1], b[0]))


def has_text(pixels, box):
    """Strong-coloured pixels (drawn text, black or a mark's colour) inside `box`, which holds no image."""
    left, top, right, bottom = box
    return bool((pixels[top:bottom, left:right].min(-1) < 120).any())


def test_a_sheet_puts_each_image_in_its_row_and_column_with_its_titles_and_captions():
    colours = [[(250, 0, 0), (0, 250, 0), (0, 0, 250)], [(250, 250, 0), (0, 250, 250), (250, 0, 250)]]
    rows = [[Tile(solid(c), [f"score {i}.{j}", "second line"], "chosen" if j == 0 else None)
             for j, c in enumerate(row)] for i, row in enumerate(colours)]
    sheet = image_sheet(rows, row_titles=["a red circle at the top", "two blue squares"],
                        col_titles=["first", "second", "third"], title="a title line")
    pixels = np.asarray(sheet)
    boxes = [[box_of(pixels, c) for c in row] for row in colours]
    for row in boxes:
        for box in row:
            assert box[2] - box[0] == TILE and box[3] - box[1] == TILE  # each image enlarged to one tile
    for i in range(2):  # a row shares its top, columns go left to right
        assert len({b[1] for b in boxes[i]}) == 1 and boxes[i][0][0] < boxes[i][1][0] < boxes[i][2][0]
    for j in range(3):  # a column shares its left edge, rows go top to bottom
        assert boxes[0][j][0] == boxes[1][j][0] and boxes[0][j][1] < boxes[1][j][1]
    # The first column is marked: its frame is green, the others' grey.
    first = boxes[0][0]
    assert tuple(pixels[first[1] - 1, first[0] - 1]) == GREEN
    assert tuple(pixels[boxes[0][1][1] - 1, boxes[0][1][0] - 1]) == MARKS[None]
    # Text: the title and column titles above the first row's band, the row titles in their bands,
    # the captions under the tiles.
    frame_top = first[1] - BORDER
    assert has_text(pixels, (0, 0, sheet.width, 20))
    for i in range(2):
        band = (0, boxes[i][0][1] - BORDER - 22, sheet.width, boxes[i][0][1] - BORDER - 2)
        assert has_text(pixels, band), i
        under = (boxes[i][1][0], boxes[i][1][3] + BORDER, boxes[i][1][2], boxes[i][1][3] + BORDER + 30)
        assert has_text(pixels, under), i
    assert not has_text(pixels, (boxes[0][2][2] + BORDER + 1, frame_top, sheet.width, boxes[0][2][3]))  # right margin


def test_long_titles_wrap_inside_the_sheet():
    prompt = "a very long prompt " * 20
    sheet = image_sheet([[Tile(solid((9, 9, 9)))]], row_titles=[prompt], col_titles=[prompt], title=prompt)
    assert sheet.width < 400  # one column: the text wraps instead of widening the sheet
    pixels = np.asarray(sheet)
    assert has_text(pixels, (0, 0, sheet.width, sheet.height))


def test_eval_grid_shows_twins_side_by_side_with_scores_and_the_winner_framed(tmp_path):
    from diffalign.evaluate import write_grid

    # 2 prompts x 3 images; the trained twin wins images 0 and 2 of prompt 0 and image 1 of prompt 1.
    base = torch.stack([solid((10 * n, 60, 60)) for n in range(6)])
    model = torch.stack([solid((60, 10 * n, 200)) for n in range(6)])
    scores = {"baseline": [0.1, 0.9, 0.2, 0.8, 0.1, 0.7], "model": [0.5, 0.3, 0.6, 0.2, 0.4, 0.1]}
    path = write_grid(tmp_path / "grid.png", base, model, 3, prompts=["a red circle", "two squares"], scores=scores,
                      reward_name="toy-reward")
    pixels = np.asarray(Image.open(path).convert("RGB"))
    for p in range(2):
        for j in range(3):
            b, m = box_of(pixels, (10 * (3 * p + j), 60, 60)), box_of(pixels, (60, 10 * (3 * p + j), 200))
            assert b[1] == m[1] and b[0] < m[0], (p, j)  # the twin is right of its base image, same row
            assert m[0] - b[2] < 3 * BORDER + 10  # and right beside it
    green = frames(pixels, GREEN)
    assert len(green) == 6  # one winner a twin pair
    winners = [(p, j) for p in range(2) for j in range(3)]
    for (p, j), frame in zip(winners, green):
        n = 3 * p + j
        winner = (60, 10 * n, 200) if scores["model"][n] > scores["baseline"][n] else (10 * n, 60, 60)
        box = box_of(pixels, winner)
        assert frame[:2] == (box[0] - BORDER, box[1] - BORDER), (p, j)
        assert has_text(pixels, (box[0], box[3] + BORDER, box[2], box[3] + BORDER + 20))  # its score
        assert has_text(pixels, (0, box[1] - BORDER - 22, 300, box[1] - BORDER - 2))  # the prompt above the row
    assert has_text(pixels, (0, 0, pixels.shape[1], 16))  # the title names the reward


def test_evaluate_writes_a_readable_grid(tmp_path):
    from helpers import brightness

    from diffalign.evaluate import evaluate
    from diffalign.testing import tiny_pipeline

    model, baseline = tiny_pipeline("sd", seed=0), tiny_pipeline("sd", seed=1)
    evaluate(model, baseline, ["a red circle", "two blue squares"], [brightness], num_images=2, seed=3,
             output_dir=tmp_path, num_inference_steps=2, guidance_scale=1.0, verbose=False)
    rows = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    pixels = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    wins = sum(r["brightness"]["model"] != r["brightness"]["baseline"] for r in rows)
    assert len(frames(pixels, GREEN)) == wins == 4  # 2 prompts x 2 images: every pair has a higher twin
    tops = sorted({f[1] for f in frames(pixels, GREEN)})
    assert len(tops) == 2  # two rows


def test_label_writes_a_sample_sheet_with_the_pair_marked(tiny_sd, prompts_file, tmp_path):
    from helpers import redness

    from diffalign import label as lab
    from diffalign.rewards import REWARDS, register_reward

    register_reward("test-red-sheet", redness, overwrite=True)
    try:
        lab.label(lab.LabelConfig(model="unused", prompts=str(prompts_file), output_dir=str(tmp_path),
                                  rewards=["test-red-sheet"], num_images=3,
                                  num_inference_steps=2, resolution=32), pipe=tiny_sd)
    finally:
        REWARDS.pop("test-red-sheet")
    pixels = np.asarray(Image.open(tmp_path / "samples.png").convert("RGB"))
    green, red = frames(pixels, GREEN), frames(pixels, RED)
    shown = min(lab.SAMPLE_PROMPTS, 5)
    assert len(green) == len(red) == shown  # best-worst: one chosen, one rejected a prompt
    for g, r in zip(green, red):
        assert g[1] == r[1] and g[0] < r[0]  # same row; the chosen (best) left of the rejected (worst)
        assert has_text(pixels, (g[0], g[3], g[2], g[3] + 20))  # its reward score
    assert len({g[0] for g in green}) == 1  # the chosen one is always first: images best first


def test_validation_sheets_gain_a_row_a_step(tiny_sd_dir, pairs_parquet, tmp_path):
    from diffalign.config import TrainConfig
    from diffalign.train import train

    out = tmp_path / "run"
    train(TrainConfig(model=tiny_sd_dir, dataset=pairs_parquet, output_dir=str(out), resolution=32, batch_size=2,
                      max_steps=2, lr=1e-3, lora_rank=4, checkpoint_every=0, validation_every=1,
                      validation_prompts=["a red square", "a blue circle", "a green star"], num_inference_steps=2))
    one, two = (Image.open(out / "validation" / f"step-00000{s}.png") for s in (1, 2))
    assert one.width == two.width and two.height > one.height  # a prompt a column, a step a row
    assert sorted(p.name for p in (out / "validation" / "images").iterdir()) == [
        f"step-00000{s}-0{i}.png" for s in (1, 2) for i in range(3)]
    pixels = np.asarray(two.convert("RGB"))
    assert has_text(pixels, (0, 0, two.width, 40))  # the title and the prompts over the columns
    new_row = one.height - PAD  # step 2's row starts where step 1's sheet ended: its band says "step 2"
    assert has_text(pixels, (0, new_row, 80, new_row + 20))
    assert (pixels[new_row:new_row + 20, :80] == pixels[new_row + 2, 2]).mean() > 0.5  # on the band's grey


@pytest.mark.parametrize("size", [8, 512])
def test_small_images_are_enlarged_without_smoothing_and_large_ones_shrunk(size):
    from diffalign.plots import _pil

    image = torch.zeros(3, size, size)
    image[0, : size // 2] = 1.0
    tile = _pil(image, TILE)
    assert tile.size == (TILE, TILE)
    values = set(np.asarray(tile)[..., 0].ravel().tolist())
    if size < TILE:
        assert values == {0, 255}  # nearest neighbour: the toy models' 32-pixel images stay sharp
    else:
        assert {0, 255} <= values
