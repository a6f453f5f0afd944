"""A loss curve as a PNG, with no plotting library: a small rasterizer, a 3x5 digit font, zlib.

Enough for `output_dir/loss.png` (train loss as a line, eval loss as dots, labelled axes); not a
general plotting tool, which would pull a large dependency into a training toolkit.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

# 3x5 glyphs, rows top to bottom, 3 bits each (MSB = left column).
_FONT = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7), "4": (5, 5, 7, 1, 1),
    "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1), "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7),
    ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0), "e": (0, 7, 7, 4, 7), " ": (0, 0, 0, 0, 0),
}
WHITE, BLACK, GREY = (255, 255, 255), (40, 40, 40), (200, 200, 200)
BLUE, ORANGE = (31, 119, 180), (255, 127, 14)


class _Canvas:
    def __init__(self, width: int, height: int):
        self.w, self.h = width, height
        self.px = [bytearray(WHITE * width) for _ in range(height)]

    def set(self, x: int, y: int, color) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            self.px[y][3 * x:3 * x + 3] = bytes(color)

    def line(self, x0: float, y0: float, x1: float, y1: float, color, width: int = 1) -> None:
        steps = int(max(abs(x1 - x0), abs(y1 - y0), 1))
        for i in range(steps + 1):
            x, y = x0 + (x1 - x0) * i / steps, y0 + (y1 - y0) * i / steps
            for dx in range(width):
                for dy in range(width):
                    self.set(round(x) + dx - width // 2, round(y) + dy - width // 2, color)

    def dot(self, x: float, y: float, color, r: int = 3) -> None:
        for dx in range(-r, r + 1):
            for dy in range(-r, r + 1):
                if dx * dx + dy * dy <= r * r:
                    self.set(round(x) + dx, round(y) + dy, color)

    def text(self, x: int, y: int, s: str, color=BLACK, scale: int = 2) -> None:
        for k, ch in enumerate(s):
            for row, bits in enumerate(_FONT.get(ch, _FONT[" "])):
                for col in range(3):
                    if bits >> (2 - col) & 1:
                        for sx in range(scale):
                            for sy in range(scale):
                                self.set(x + (4 * k + col) * scale + sx, y + row * scale + sy, color)

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(row) for row in self.px)

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _label(v: float) -> str:
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def loss_curve_png(path: str | Path, train: list[tuple[int, float]], evals: list[tuple[int, float]] = (),
                   width: int = 640, height: int = 400) -> Path:
    """Write a PNG: train loss (blue line) and eval loss (orange dots) against the step."""
    c = _Canvas(width, height)
    left, right, top, bottom = 70, width - 20, 20, height - 40
    points = list(train) + list(evals)
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    if finite:
        smin, smax = min(s for s, _ in finite), max(s for s, _ in finite)
        vmin, vmax = min(v for _, v in finite), max(v for _, v in finite)
        if smax == smin:
            smax = smin + 1
        if vmax == vmin:
            vmax = vmin + 1
        pad = 0.05 * (vmax - vmin)
        # Losses are not negative: the axis starts at 0 rather than below it.
        vmin, vmax = (max(0.0, vmin - pad) if vmin >= 0 else vmin - pad), vmax + pad

        def xy(s: float, v: float) -> tuple[float, float]:
            return (left + (s - smin) / (smax - smin) * (right - left), bottom - (v - vmin) / (vmax - vmin) * (bottom - top))

        for i in range(5):  # grid and tick labels
            v = vmin + (vmax - vmin) * i / 4
            _, y = xy(smin, v)
            c.line(left, y, right, y, GREY)
            c.text(4, int(y) - 5, _label(v))
            s = smin + (smax - smin) * i / 4
            x, _ = xy(s, vmin)
            c.text(int(x) - 8, bottom + 10, str(round(s)))
        line = [xy(s, v) for s, v in train if math.isfinite(v)]
        for (x0, y0), (x1, y1) in zip(line, line[1:]):
            c.line(x0, y0, x1, y1, BLUE, width=2)
        for s, v in evals:
            if math.isfinite(v):
                c.dot(*xy(s, v), ORANGE)
    c.line(left, top, left, bottom, BLACK)
    c.line(left, bottom, right, bottom, BLACK)
    path = Path(path)
    path.write_bytes(c.png())
    return path
