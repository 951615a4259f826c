import io

import pytest


def _png(color, size=36):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    from diffalign.testing import save_tiny_pipeline

    return str(save_tiny_pipeline("sd", tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    from diffalign.testing import save_tiny_pipeline

    return str(save_tiny_pipeline("sd3", tmp_path_factory.mktemp("tiny-sd3")))


@pytest.fixture(scope="session")
def pairs_parquet(tmp_path_factory):
    """8 Pick-a-Pic rows (winner in either column) plus one tie that must be dropped."""
    import pandas as pd

    rows = []
    for i in range(8):
        win, lose = _png((200, 20 * i, 30)), _png((30, 20 * i, 200))
        first_wins = i % 2 == 0
        rows.append({
            "caption": f"a red square number {i}",
            "jpg_0": win if first_wins else lose,
            "jpg_1": lose if first_wins else win,
            "label_0": 1.0 if first_wins else 0.0,
            "label_1": 0.0 if first_wins else 1.0,
        })
    rows.append({"caption": "a tie", "jpg_0": _png((0, 0, 0)), "jpg_1": _png((9, 9, 9)), "label_0": 0.5, "label_1": 0.5})
    path = tmp_path_factory.mktemp("data") / "pairs.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return str(path)
