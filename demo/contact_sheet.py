"""A self-contained HTML page of the demo's hits: photos with the regions their words matched."""

from __future__ import annotations

import base64
import html
from pathlib import Path

COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4"]


def _photo(path: Path, matches, size: int = 224) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    boxes = []
    for colour, match in zip(COLOURS, matches, strict=False):
        x1, y1, x2, y2 = (float(v) * size for v in match.box)
        boxes.append(
            f'<rect x="{x1:.0f}" y="{y1:.0f}" width="{x2 - x1:.0f}" height="{y2 - y1:.0f}" fill="none" stroke="{colour}" stroke-width="3"/>'
            f'<text x="{x1 + 3:.0f}" y="{y1 + 14:.0f}" fill="{colour}" font-size="13" font-weight="bold">{html.escape(match.word)}</text>'
        )
    return (
        f'<svg width="{size}" height="{size}" xmlns="http://www.w3.org/2000/svg">'
        f'<image href="data:image/jpeg;base64,{data}" width="{size}" height="{size}"/>{"".join(boxes)}</svg>'
    )


def write_contact_sheet(path: Path, sections, data) -> Path:
    """sections: ("caption", query text, hits over photos) or ("image", photo name, hits over captions)."""
    parts = [
        "<!doctype html><meta charset='utf-8'><title>TERAN search demo</title>",
        "<style>body{font-family:sans-serif;margin:20px}.row{display:flex;gap:12px;flex-wrap:wrap}"
        ".hit{width:224px;font-size:12px}h2{margin-top:28px}</style>",
        "<h1>TERAN cross-modal search: Flickr8k dev photos</h1>",
        "<p>First stage: global-vector cosine; final order: TERAN MrSw alignment. Boxes: the regions that the "
        "query's most confident words matched.</p>",
    ]
    for kind, query, hits in sections:
        if kind == "caption":
            parts.append(f"<h2>&ldquo;{html.escape(query)}&rdquo;</h2><div class='row'>")
            for place, hit in enumerate(hits, 1):
                caption = data.captions[data.names.index(hit.id)][0]
                photo = _photo(data.root / "images" / hit.id, hit.strongest_matches(4))
                parts.append(
                    f"<div class='hit'>{photo}<br><b>{place}. {html.escape(hit.id)}</b>"
                    f"<br>score {hit.score:.3f} (first stage {hit.first_stage:.3f})<br><i>{html.escape(caption)}</i></div>"
                )
        else:
            parts.append(f"<h2>Photo query: {html.escape(query)}</h2><div class='row'>")
            # For photo queries the alignment boxes lie on the query photo: show the best caption's words there.
            matches = hits[0].strongest_matches(4) if hits else []
            parts.append(f"<div class='hit'>{_photo(data.root / 'images' / query, matches)}</div><div><ol>")
            for hit in hits:
                owner, number = hit.id.split("#")
                caption = data.captions[data.names.index(owner)][int(number)]
                own = " <b>(its own caption)</b>" if owner == query else ""
                parts.append(f"<li>{html.escape(caption)} &mdash; {hit.score:.3f}{own}</li>")
            parts.append("</ol></div>")
        parts.append("</div>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path
