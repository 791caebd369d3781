"""Contact sheets: thumbnails side by side with a caption under each, so people decide by looking.

Only reads the images. A file that moved, vanished or cannot be decoded becomes a grey placeholder
tile that says so; drawing a sheet never fails because of one image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from featx import config
from featx.files import is_url, replaced_atomically
from featx.images import remote
from featx.images.decoder import _to_rgb, open_image

PAD = 6  # pixels between tiles
LINE = 14  # pixels per caption line
BACKGROUND = (255, 255, 255)
PLACEHOLDER = (200, 200, 200)


@dataclass
class Tile:
    """One image and the caption lines under it; image None draws a placeholder. `name` names it
    in the list of unreadable images (default: the image path)."""

    image: Path | None
    lines: list[str] = field(default_factory=list)
    name: str | None = None


@dataclass
class Block:
    """Tiles side by side with an optional heading above them (a duplicate group's kind and
    similarity); a row of a sheet holds one or more blocks."""

    tiles: list[Tile]
    heading: str | None = None


def _font(size: int = 11):
    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except TypeError:  # pragma: no cover - Pillow < 10.1
        return ImageFont.load_default()


def thumbnail(path: Path | None, size: int) -> tuple[Image.Image, str | None]:
    """(a size x size RGB tile with the image fitted inside, aspect ratio kept; None) or
    (a grey placeholder; the reason: "missing" or "unreadable")."""
    tile = Image.new("RGB", (size, size), BACKGROUND)
    reason = None
    if path is None or not (is_url(path) or Path(path).is_file()):
        reason = "missing"
    else:
        try:
            with open_image(io.BytesIO(remote.read(path)) if is_url(path) else path) as img:
                if img.width * img.height > config.MAX_IMAGE_PIXELS:
                    raise ValueError("too many pixels")
                if img.format == "JPEG":
                    img.draft(img.mode, (size, size))  # decode at reduced scale: fast
                img = _to_rgb(ImageOps.exif_transpose(img))
                img.thumbnail((size, size), Image.Resampling.BILINEAR)
                tile.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
        except Exception:  # any decoding problem draws a placeholder, never a crash
            reason = "unreadable"
    if reason:
        draw = ImageDraw.Draw(tile)
        draw.rectangle((0, 0, size - 1, size - 1), fill=PLACEHOLDER, outline=(120, 120, 120))
        draw.text((size // 2, size // 2), reason, fill=(60, 60, 60), font=_font(13), anchor="mm")
    return tile, reason


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def write_sheet(path: str | Path, title: str, rows: list[list[Block]], size: int) -> dict:
    """Draw `rows` of blocks of tiles under `title` into a PNG at `path` (written atomically).

    Returns {"path": the PNG, "unreadable": {tile name: reason} for the placeholders drawn}.
    """
    font, title_font = _font(11), _font(14)
    tiles = [t for row in rows for block in row for t in block.tiles]
    lines = max((len(t.lines) for t in tiles), default=0)
    columns = max((sum(len(b.tiles) for b in row) + len(row) - 1 for row in rows), default=1)
    heading = LINE + 2 if any(b.heading for row in rows for b in row) else 0
    cell_w, cell_h = size + PAD, heading + size + lines * LINE + PAD
    width = max(PAD + columns * cell_w, 360)
    sheet = Image.new("RGB", (width, PAD + 24 + len(rows) * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    black, red = (0, 0, 0), (160, 0, 0)
    draw.text(
        (PAD, PAD), _fit(draw, title, width - 2 * PAD, title_font), fill=black, font=title_font
    )
    problems: dict[str, str] = {}
    for r, row in enumerate(rows):
        y = PAD + 24 + r * cell_h
        column = 0
        for block in row:
            x0 = PAD + column * cell_w
            if block.heading:
                room = len(block.tiles) * cell_w - PAD
                draw.text((x0, y), _fit(draw, block.heading, room, font), fill=red, font=font)
            for c, tile in enumerate(block.tiles):
                x = x0 + c * cell_w
                image, reason = thumbnail(tile.image, size)
                if reason:
                    problems[tile.name or str(tile.image)] = reason
                sheet.paste(image, (x, y + heading))
                for i, text in enumerate(tile.lines):
                    xy = (x, y + heading + size + 1 + i * LINE)
                    draw.text(xy, _fit(draw, text, size, font), fill=black, font=font)
            column += len(block.tiles) + 1  # an empty column between blocks
    with replaced_atomically(path) as tmp:
        sheet.save(tmp, "PNG")
    return {"path": Path(path), "unreadable": problems}


def pack(blocks: list[Block], columns: int) -> list[list[Block]]:
    """Blocks in reading order, as many per row as fit in `columns` tiles (with one empty
    column between blocks); a block wider than a row gets a row of its own."""
    rows: list[list[Block]] = []
    used = columns + 1
    for block in blocks:
        need = len(block.tiles) + (1 if used else 0)
        if not rows or used + need > columns:
            rows.append([block])
            used = len(block.tiles)
        else:
            rows[-1].append(block)
            used += need
    return rows
