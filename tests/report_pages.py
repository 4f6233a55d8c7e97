"""Opening an ``rlstream report`` page the way a reader would: parse its HTML and decode every
embedded PNG (shared by the unit test on fabricated metrics and the end-to-end run)."""
from __future__ import annotations

import base64
import io
from html.parser import HTMLParser
from pathlib import Path

from PIL import Image

PREFIX = "data:image/png;base64,"


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.headings: list[str] = []
        self.images: dict[str, str] = {}  # alt -> src
        self.missing: list[str] = []  # headings followed by "not in this run's metrics"
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        self._in = tag
        if tag == "img":
            a = dict(attrs)
            self.images[a["alt"]] = a["src"]

    def handle_data(self, data):
        if self._in == "h2":
            self.headings.append(data)
        elif self._in == "p" and "not in this run" in data:
            self.missing.append(self.headings[-1])

    def handle_endtag(self, tag):
        self._in = None


def open_report(path: Path) -> tuple[list[str], dict[str, tuple[int, int]], list[str]]:
    """(section headings, image alt -> decoded (width, height), sections without a plot)."""
    page = _Page()
    page.feed(path.read_text())
    sizes = {}
    for alt, src in page.images.items():
        assert src.startswith(PREFIX), src[:40]
        img = Image.open(io.BytesIO(base64.b64decode(src[len(PREFIX):])))
        assert img.format == "PNG"
        img.load()  # decodes every pixel: a truncated or corrupt PNG raises here
        sizes[alt] = img.size
    return page.headings, sizes, page.missing
