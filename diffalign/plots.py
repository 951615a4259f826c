"""Pictures a user looks at: training curves (matplotlib, headless) and image sheets (PIL)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch


def plot_curves(rows: list[dict], keys: Sequence[str], png_path: str | Path, smooth: int = 0) -> None:
    """One panel per metric against the step, raw and (when long enough) a moving average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    window = smooth or max(1, len(rows) // 20)
    for ax, key in zip(axes[0], keys):
        steps = [r["step"] for r in rows if key in r]
        values = [r[key] for r in rows if key in r]
        ax.plot(steps, values, alpha=0.35, label=key)
        if window > 1 and len(values) > window:
            kernel = torch.ones(window) / window
            smoothed = torch.nn.functional.conv1d(torch.tensor(values).view(1, 1, -1), kernel.view(1, 1, -1)).view(-1)
            ax.plot(steps[window - 1 :], smoothed.tolist(), label=f"{key} (mean of {window})")
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    data = png_bytes(fig)
    plt.close(fig)
    from diffalign.edges import write_files

    write_files(Path(png_path).parent, {Path(png_path).name: data}, "the training curves")


# ------------------------------------------------------------------------------ image sheets
# Pictures a person reads: every image at a readable size, its scores under it, the row's prompt
# above the row and the column's title on top, drawn with PIL's own font (no font files, no network).

TILE = 160  # pixels a side: toy models make 32-pixel images, shown enlarged without smoothing
BORDER = 4  # the frame that marks a chosen (green) or rejected (red) image
PAD = 6
GROUP_GAP = 14  # extra space between column groups (eval: between twin pairs)
MARKS = {"chosen": (30, 140, 50), "rejected": (200, 45, 45), None: (225, 225, 225)}
INK, MUTED, BAND = (20, 20, 20), (90, 90, 90), (238, 238, 238)


@dataclass
class Tile:
    """One image of a sheet and the text under it."""

    image: Any  # (3, H, W) float in [0, 1] or uint8 tensor, (H, W, 3) uint8 array, PIL image or file
    caption: Sequence[str] = ()  # lines under the image (scores, rank)
    mark: str | None = None  # "chosen" (green frame) | "rejected" (red frame) | None


def sheet_font(size: int = 14):
    """PIL's built-in scalable font (Pillow >= 10.1 with FreeType), else its bitmap font."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # older Pillow or no FreeType: the fixed 11-pixel font
        return ImageFont.load_default()


def image_sheet(rows: Sequence[Sequence[Tile | None]], *, row_titles: Sequence[str] | None = None,
                col_titles: Sequence[str] | None = None, title: str | None = None, tile: int = TILE,
                group: int = 0):
    """A PIL image: a title line, column titles, then per row a band with its title (e.g. the
    prompt) above its tiles. `group` > 0 leaves a gap after every `group` columns."""
    from PIL import Image, ImageDraw

    font, small = sheet_font(15), sheet_font(13)
    line, small_line = _line_height(font), _line_height(small)
    n_cols = max((len(r) for r in rows), default=0)
    cell = tile + 2 * BORDER
    xs = [PAD + j * (cell + PAD) + (GROUP_GAP * (j // group) if group else 0) for j in range(n_cols)]
    width = max(xs[-1] + cell + PAD if xs else 2 * PAD, 320)
    caption_lines = max((len(t.caption) for r in rows for t in r if t is not None), default=0)
    row_h = cell + (caption_lines * small_line + PAD if caption_lines else 0)

    title_lines = _wrap(title, font, width - 2 * PAD, 3) if title else []
    col_lines = [_wrap(t, small, cell, 3) for t in col_titles] if col_titles else []
    header = PAD + len(title_lines) * line + (max(map(len, col_lines), default=0) * small_line + PAD if col_lines else 0)
    bands = [_wrap(t, font, width - 2 * PAD, 2) for t in row_titles] if row_titles else [[] for _ in rows]
    band_h = [len(b) * line + PAD if b else 0 for b in bands]
    height = header + sum(band_h) + len(rows) * (row_h + PAD) + PAD

    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    y = PAD
    for text in title_lines:
        draw.text((PAD, y), text, fill=INK, font=font)
        y += line
    for j, lines in enumerate(col_lines[:n_cols]):
        for k, text in enumerate(lines):
            draw.text((xs[j] + (cell - draw.textlength(text, font=small)) / 2, y + k * small_line), text, fill=INK, font=small)
    y = header
    for i, row in enumerate(rows):
        if band_h[i]:
            draw.rectangle((0, y, width, y + band_h[i] - 2), fill=BAND)
            for k, text in enumerate(bands[i]):
                draw.text((PAD, y + PAD // 2 + k * line), text, fill=INK, font=font)
            y += band_h[i]
        for j, item in enumerate(row):
            if item is None:
                continue
            x = xs[j]
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=MARKS.get(item.mark, MARKS[None]))
            sheet.paste(_pil(item.image, tile), (x + BORDER, y + BORDER))
            for k, text in enumerate(item.caption):
                colour = MARKS[item.mark] if item.mark and k == len(item.caption) - 1 else INK
                draw.text((x, y + cell + 2 + k * small_line), _fit(text, small, cell), fill=colour, font=small)
        y += row_h + PAD
    return sheet


def png_bytes(image) -> bytes:
    """A PIL image (or a matplotlib figure) as PNG bytes, for an atomic write."""
    import io

    buffer = io.BytesIO()
    if hasattr(image, "savefig"):
        image.savefig(buffer, format="png", dpi=110)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_image_sheet(path: str | Path, rows: Sequence[Sequence[Tile | None]], what: str = "the picture", **options) -> Path:
    """`image_sheet(rows, **options)` written as PNG (`edges.write_files`: atomic, one line on a full disk)."""
    from diffalign.edges import write_files

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_files(path.parent, {path.name: png_bytes(image_sheet(rows, **options))}, what)[0]


def _pil(image: Any, size: int):
    """Any image form a sheet takes -> an RGB PIL image of size x size (enlarged without smoothing)."""
    import numpy as np
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            image = opened.convert("RGB")
    if isinstance(image, torch.Tensor):
        array = image.detach().cpu()
        if array.dtype != torch.uint8:
            array = (array.float().clamp(0, 1) * 255).round().to(torch.uint8)
        image = array.permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.NEAREST if max(image.size) < size else Image.LANCZOS)


def _line_height(font) -> int:
    box = font.getbbox("Ag")
    return box[3] - min(box[1], 0) + 4


def _fit(text: str, font, width: int) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """Words wrapped to `width` pixels, at most `max_lines` lines (the last one cut with an ellipsis)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [_fit(" ".join(lines[max_lines - 1 :]), font, width)]
    return [_fit(line, font, width) for line in lines]


# ------------------------------------------------------------------------------ videos


def video_frames_uint8(video: Any):
    """(F, 3, H, W) tensor (uint8, or float in [0, 1]) or (F, H, W, 3) uint8 array -> (F, H, W, 3) uint8 array."""
    import numpy as np

    if isinstance(video, torch.Tensor):
        array = video.detach().cpu()
        if array.dtype != torch.uint8:
            array = (array.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return array.permute(0, 2, 3, 1).contiguous().numpy()
    return np.ascontiguousarray(video, dtype=np.uint8)


def mp4_bytes(video: Any, fps: float) -> bytes:
    """A video as H.264 mp4 bytes (yuv420p, what every player reads; odd sizes padded by one
    pixel, as yuv420p needs even ones), for an atomic write. PyAV (`pip install diffalign[video]`)."""
    import io
    from fractions import Fraction

    import numpy as np

    try:
        import av
    except ImportError:
        from diffalign.errors import DiffalignError

        raise DiffalignError("writing mp4 needs PyAV: pip install 'diffalign[video]'") from None
    frames = video_frames_uint8(video)
    frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)), mode="edge")
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def gif_bytes(frames: Sequence[Any], fps: float) -> bytes:
    """PIL images (or anything `image_sheet` tiles take) as a looping GIF."""
    import io

    images = [frame if hasattr(frame, "save") else _pil(frame, max(frame.shape[-2:])) for frame in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return buffer.getvalue()
