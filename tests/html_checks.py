"""Checks of a report page as a reader meets it: well-formed HTML, self-contained, figures that decode to real
pictures, tables that hold the numbers of metrics.json, and a page that a browser (headless Chromium, Debian's
package; `make test` installs it) renders with its figures. A helper module: test files import it by name."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from matplotlib import image as mpimg

VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
PNG_PREFIX = "data:image/png;base64,"


class StrictParser(HTMLParser):
    """html.parser plus the checks it does not make: balanced tags, one doctype, every src/href collected, and the
    text of every table cell by table."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: Counter = Counter()
        self.images: list[dict] = []
        self.links: list[str] = []
        self.doctype = ""
        self.tables: list[dict[str, list]] = []  # {"header": [...], "rows": [[...], ...]}
        self._cell: list[str] | None = None

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag, attrs) -> None:
        attributes = dict(attrs)
        self.tags[tag] += 1
        self.links += [attributes[k] for k in ("src", "href") if k in attributes]
        if tag == "img":
            self.images.append(attributes)
        if tag == "table":
            self.tables.append({"header": [], "rows": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th"):
            self._cell = []
        if tag not in VOID_TAGS:
            self.stack.append(tag)

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag) -> None:
        if tag in ("td", "th") and self._cell is not None and self.tables:
            text = "".join(self._cell).strip()
            if tag == "th":
                self.tables[-1]["header"].append(text)
            else:
                self.tables[-1]["rows"][-1].append(text)
            self._cell = None
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()

    def table(self, *header_start: str) -> list[list[str]]:
        """Rows (the header row left out) of the one table whose header starts with ``header_start``."""
        matches = [t for t in self.tables if t["header"][:len(header_start)] == list(header_start)]
        assert len(matches) == 1, (header_start, [t["header"] for t in self.tables])
        return [row for row in matches[0]["rows"] if row]


def parse_page(path: Path) -> StrictParser:
    parser = StrictParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    assert parser.errors == [] and parser.stack == [], (parser.errors, parser.stack)
    assert parser.doctype.lower() == "doctype html"
    assert parser.tags["html"] == parser.tags["head"] == parser.tags["body"] == parser.tags["title"] == 1
    return parser


def assert_self_contained(page: Path, parser: StrictParser) -> None:
    text = page.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    assert parser.tags["script"] == 0 and parser.tags["link"] == 0 and "url(" not in text
    assert all(link.startswith(PNG_PREFIX) for link in parser.links)


def decoded_images(parser: StrictParser) -> dict[str, np.ndarray]:
    """Every embedded figure decoded as a PNG (data-file name -> RGB(A) array); each a real picture: larger than
    an icon and not one flat colour."""
    images = {}
    for img in parser.images:
        assert img["src"].startswith(PNG_PREFIX), img["src"][:40]
        pixels = mpimg.imread(io.BytesIO(base64.b64decode(img["src"][len(PNG_PREFIX):], validate=True)), format="png")
        assert pixels.ndim == 3 and min(pixels.shape[:2]) >= 100, (img.get("data-file"), pixels.shape)
        assert pixels[..., :3].std() > 0.01, img.get("data-file")
        images[img["data-file"]] = pixels
    return images


def assert_embeds_every_figure(out: Path, parser: StrictParser) -> set[str]:
    """Every PNG written beside the page is embedded once, byte for byte, and decodes."""
    written = {p.name for p in out.glob("*.png")}
    embedded = {img["data-file"]: img["src"] for img in parser.images}
    assert set(embedded) == written and len(parser.images) == len(written)
    for name, src in embedded.items():
        assert base64.b64decode(src[len(PNG_PREFIX):]) == (out / name).read_bytes()
    assert set(decoded_images(parser)) == written
    return written


def fmt(value: float | int | None) -> str:
    """A number as the page shows it: floats with four decimals, integers as they are, None as n/a."""
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def assert_tables_hold_metrics(parser: StrictParser, metrics: dict) -> None:
    """The page's tables show the numbers of metrics.json: segmentation summaries, classification numbers, the
    confusion matrix and every per-case row."""
    from nnunet_mtl.evaluation.metrics import METRIC_LABELS, SEGMENTATION_METRICS

    segmentation = {row[0]: row[1:] for row in parser.table("metric", "mean", "median", "std", "min", "max")}
    for key, stats in metrics["segmentation"].items():
        expected = [fmt(stats[s]) for s in ("mean", "median", "std", "min", "max")]
        assert segmentation[METRIC_LABELS.get(key, key)] == expected, key
    per_case = {row[0]: row[1:] for row in parser.table("case")}
    assert sorted(per_case) == sorted(c["case"] for c in metrics["per_case"])
    for case in metrics["per_case"]:
        assert per_case[case["case"]][:len(SEGMENTATION_METRICS)] == [fmt(case[m]) for m in SEGMENTATION_METRICS]
    classification = metrics.get("classification")
    if classification is None:
        return
    numbers = {row[0]: row[1:] for row in parser.table("metric", "value")}
    assert numbers["accuracy"] == [fmt(classification["accuracy"])]
    assert numbers["macro F1"] == [fmt(classification["macro"]["f1"])]
    assert numbers["balanced accuracy"] == [fmt(classification["balanced_accuracy"])]
    confusion = {row[0]: row[1:] for row in parser.table("", *(f"predicted: {n}" for n in
                                                                 classification["class_names"]))}
    for name, counts in zip(classification["class_names"], classification["confusion_matrix"]):
        assert confusion[f"truth: {name}"] == [str(n) for n in counts]


def chromium_screenshot(page: Path, out: Path, size: tuple[int, int] = (1200, 1800)) -> np.ndarray:
    """Render ``page`` with headless Chromium and return the screenshot's pixels (RGB(A), 0..1).

    Absent Chromium is a failure, not a skip: `make test` installs it (Debian's `chromium` package)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "chromium is not installed: `make test` installs it (apt-get install chromium)"
    shot = out / "screenshot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={out / 'chromium-profile'}", f"--window-size={size[0]},{size[1]}",
                    f"--screenshot={shot}", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=180)
    return mpimg.imread(shot)


def coloured_fraction(pixels: np.ndarray) -> float:
    """Share of pixels with a clear colour (not white, grey or black): the figures' colour maps and markers. Text,
    table rules and a broken-image placeholder are grey."""
    rgb = pixels[..., :3].astype(float)
    return float(((rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.15).mean())
