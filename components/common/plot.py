"""Small line charts drawn with Pillow (no plotting library in the dependencies): enough for
"quality against network evaluations" in MLflow."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 62, 16, 30, 70


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, x_label: str, y_label: str,
               log2_x: bool = True, size: tuple[int, int] = (480, 340)) -> Image.Image:
    """One line per series (points sorted by x) with markers, axes, ticks and a legend below."""
    image = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    points = [p for pts in series.values() for p in pts if math.isfinite(p[1])]
    if not points:
        draw.text((10, 10), f"{title}: no data", fill="black", font=font)
        return image
    fx = (lambda x: math.log2(x)) if log2_x else (lambda x: x)
    xs, ys = [fx(x) for x, _ in points], [y for _, y in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.08 or max(abs(y1) * 0.05, 1e-3)
    y0, y1 = y0 - pad, y1 + pad
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    left, top = MARGIN_LEFT, MARGIN_TOP
    right, bottom = size[0] - MARGIN_RIGHT, size[1] - MARGIN_BOTTOM

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (fx(x) - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 10), f"{title} ({y_label})" if y_label not in title else title, fill="black", font=font)
    for y in _ticks(y0, y1):
        _, py = to_px(2 ** x0 if log2_x else x0, y)
        draw.line([left - 4, py, left, py], fill="black")
        draw.text((4, py - 6), f"{y:.4g}", fill="black", font=font)
    for x in sorted({x for x, _ in points}):
        px, _ = to_px(x, y0)
        draw.line([px, bottom, px, bottom + 4], fill="black")
        draw.text((px - 6, bottom + 6), f"{x:g}", fill="black", font=font)
    draw.text(((left + right) // 2 - 3 * len(x_label), bottom + 20), x_label, fill="black", font=font)
    for k, (name, pts) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        pixels = [to_px(x, y) for x, y in sorted(pts) if math.isfinite(y)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        legend_y = bottom + 34 + 12 * (k // 2)
        legend_x = left + (k % 2) * (right - left) // 2
        draw.rectangle([legend_x, legend_y + 2, legend_x + 10, legend_y + 10], fill=colour)
        draw.text((legend_x + 14, legend_y), name, fill="black", font=font)
    return image


def side_by_side(images: list[Image.Image]) -> Image.Image:
    width, height = sum(i.width for i in images), max(i.height for i in images)
    out, x = Image.new("RGB", (width, height), "white"), 0
    for image in images:
        out.paste(image, (x, 0))
        x += image.width
    return out
