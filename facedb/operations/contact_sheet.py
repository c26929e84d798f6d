"""Contact sheets of a clustering: one row of face thumbnails per cluster (its central face first), so people
can look at who was grouped with whom. Written as self-contained HTML (every thumbnail embedded as a
``data:`` URI, nothing fetched from anywhere) or as one PNG image.

Rows show the largest ``max_clusters`` clusters, ``per_row`` faces each (the central face first, then the
others by similarity to it; "+N" when a cluster has more), then one row of unclustered faces. Thumbnails are
square crops around the face box (a quarter of its size added on every side), ``thumb`` pixels wide.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from ..errors import FaceDBError, InvalidInputError
from ..faces.images import PhotoSource, load_photo
from ..fsio import write_atomic
from ..records import ClusterFace, ClusterReport

SHEET_SUFFIXES = (".html", ".htm", ".png")


def _thumbnail(pixels: object, box: Sequence[float], size: int) -> Image.Image:
    img = Image.fromarray(pixels)  # type: ignore[arg-type]
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1) * 1.5
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    crop = img.crop((int(cx - side / 2), int(cy - side / 2), int(cx + side / 2), int(cy + side / 2)))
    return crop.resize((size, size), Image.Resampling.LANCZOS)


class _Thumbs:
    """Thumbnails by face, decoding each photo once (the last one is kept: a cluster's faces come photo by
    photo only by chance, so this is a small cache, not a promise)."""

    def __init__(self, sources: Sequence[PhotoSource], size: int) -> None:
        self.sources, self.size = sources, size
        self._cache: dict[int, object] = {}

    def __call__(self, face: ClusterFace) -> Image.Image:
        if face.photo_index not in self._cache:
            if len(self._cache) > 32:
                self._cache.clear()
            try:
                self._cache[face.photo_index] = load_photo(self.sources[face.photo_index]).pixels
            except FaceDBError:
                self._cache[face.photo_index] = None
        pixels = self._cache[face.photo_index]
        if pixels is None:  # the photo changed or vanished since it was clustered
            return Image.new("RGB", (self.size, self.size), (90, 90, 90))
        return _thumbnail(pixels, face.box, self.size)


def _rows(report: ClusterReport, max_clusters: int, per_row: int) -> list[tuple[str, list[ClusterFace], int]]:
    rows = [(f"cluster {c.id} · {c.size} faces", c.faces[:per_row], max(0, c.size - per_row))
            for c in report.clusters[:max_clusters]]
    if report.unclustered:
        rows.append((f"unclustered · {len(report.unclustered)} faces", report.unclustered[:per_row],
                     max(0, len(report.unclustered) - per_row)))
    return rows


def _title(report: ClusterReport, shown: int) -> str:
    more = f" (the largest {shown} shown)" if shown < len(report.clusters) else ""
    return (f"{len(report.clusters)} clusters{more}, {len(report.unclustered)} faces unclustered, {report.faces} "
            f"faces in {report.photos} photos · {report.rule} linkage at similarity {report.threshold:.3f}")


def write_sheet(report: ClusterReport, sources: Sequence[PhotoSource], path: Path, *, max_clusters: int = 100,
                per_row: int = 12, thumb: int = 96) -> Path:
    """Write the contact sheet to ``path`` (``.html``/``.htm``: self-contained HTML; ``.png``: one image)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SHEET_SUFFIXES:
        raise InvalidInputError(f"a contact sheet is written as .html or .png, not {path.name!r}")
    thumbs = _Thumbs(sources, thumb)
    rows = _rows(report, max_clusters, per_row)
    shown = min(max_clusters, len(report.clusters))
    if suffix == ".png":
        _write_png(path, rows, thumbs, _title(report, shown), per_row, thumb)
    else:
        _write_html(path, rows, thumbs, _title(report, shown), thumb)
    return path


def _data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _write_html(path: Path, rows: list[tuple[str, list[ClusterFace], int]], thumbs: _Thumbs, title: str,
                thumb: int) -> None:
    out = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8"><title>facedb clusters</title>',
           "<style>body{font-family:sans-serif;margin:1em}div.row{margin:.6em 0}div.label{font-size:.9em;"
           "color:#333}img{margin:1px;border:2px solid #ddd}img.central{border-color:#2a7}"
           "span.more{color:#777;vertical-align:middle;margin-left:.4em}</style></head><body>",
           f"<h1>facedb clusters</h1><p>{html.escape(title)}</p>"]
    for label, faces, more in rows:
        out.append(f'<div class="row"><div class="label">{html.escape(label)}</div>')
        for i, face in enumerate(faces):
            tip = html.escape(f"{face.photo} box={face.box}")
            cls = ' class="central"' if i == 0 and face.cluster is not None else ""
            out.append(f'<img{cls} src="{_data_uri(thumbs(face))}" width="{thumb}" height="{thumb}" '
                       f'title="{tip}" alt="{tip}">')
        if more:
            out.append(f'<span class="more">+{more}</span>')
        out.append("</div>")
    out.append("</body></html>")
    write_atomic(path, "\n".join(out).encode("utf-8"))


def _write_png(path: Path, rows: list[tuple[str, list[ClusterFace], int]], thumbs: _Thumbs, title: str,
               per_row: int, thumb: int) -> None:
    pad, label_h, head = 4, 14, 24
    width = pad + per_row * (thumb + pad) + 40
    height = head + len(rows) * (label_h + thumb + 2 * pad) + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 6), title, fill=(0, 0, 0))
    y = head
    for label, faces, more in rows:
        draw.text((pad, y), label, fill=(40, 40, 40))
        y += label_h
        for i, face in enumerate(faces):
            x = pad + i * (thumb + pad)
            sheet.paste(thumbs(face), (x, y))
            if i == 0 and face.cluster is not None:
                draw.rectangle((x - 1, y - 1, x + thumb, y + thumb), outline=(40, 170, 110), width=2)
        if more:
            draw.text((pad + len(faces) * (thumb + pad), y + thumb // 2 - 6), f"+{more}", fill=(110, 110, 110))
        y += thumb + 2 * pad
    buf = io.BytesIO()
    sheet.save(buf, "PNG", optimize=True)
    write_atomic(path, buf.getvalue())
