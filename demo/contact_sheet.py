"""A self-contained HTML page of the demo's hits: photos with the regions their words matched.

Each photo shows one box per matched region: the words that matched the same region share its
box and its one label ("dog, frisbee"). Labels have a filled background in the box's colour, are
placed so that no two overlap and each stays inside the photo (`place_labels`), and are tied to
a box they do not touch by a line. Under each photo the words are listed with their similarity.
"""

from __future__ import annotations

import base64
import html
import mimetypes
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageFont

# Dark enough for white label text and for coloured text on the white page.
COLOURS = ["#d62728", "#1f5fbf", "#1e8a3c", "#8e3fb8", "#c25100", "#00838f", "#a0306e", "#5d6b00"]
PHOTO_WIDTH = 320  # CSS pixels
GAP = 16  # between hit cards
PAGE_MARGIN = 24
HITS_PER_ROW = 5
PAGE_WIDTH = HITS_PER_ROW * PHOTO_WIDTH + (HITS_PER_ROW - 1) * GAP + 2 * PAGE_MARGIN  # what the screenshot renders at
SHOWN_WORDS = 6  # most similar words drawn per photo
LABEL_FONT = 14  # px, bold
LABEL_HEIGHT = 20
LABEL_PAD = 5  # horizontal padding inside a label
STROKE = 3  # box outline width
SIMILARITY_SCALE = "mean cosine of the word's pieces and the region, -1..1"

Rect = tuple[float, float, float, float]  # x, y, width, height in pixels


@dataclass
class Section:
    """One query of the page: kind "caption" (query text, hits over photos) or "image" (photo name, hits over captions)."""

    kind: str
    query: str
    hits: list
    ranking: str = ""  # SearchResponse.ranking: how each hit's score was computed


@dataclass
class Group:
    """The shown words that matched one region: they share one box and one label."""

    region: int
    box: tuple[float, float, float, float] | None  # normalised x1, y1, x2, y2; None without boxes
    matches: list = field(default_factory=list)  # most similar first

    @property
    def label(self) -> str:
        return ", ".join(m.word for m in self.matches)


def group_by_region(matches: Iterable) -> list[Group]:
    """Group word matches by region, strongest group (its most similar word) first; words inside a
    group stay in the order given (pass them most similar first)."""
    groups: dict[object, Group] = {}
    for match in matches:
        box = tuple(float(v) for v in match.box) if len(match.box) == 4 else None
        key = (match.region, box)
        groups.setdefault(key, Group(match.region, box)).matches.append(match)
    return sorted(groups.values(), key=lambda g: -max(m.similarity for m in g.matches))


def describe_ranking(ranking: str) -> str:
    """A sentence saying how SearchHit.score was computed, from SearchResponse.ranking."""
    ranking = (ranking or "").strip()
    if ranking.startswith("blend w="):
        blend, _, hub = ranking.removeprefix("blend w=").partition(", hub ")
        try:
            weight, penalty = float(blend), float(hub) if hub else None
        except ValueError:
            return f"score: {html.escape(ranking)}"
        text = (
            f"score = global-vector cosine + {weight:g} &times; TERAN alignment "
            "(MrSw: the sum over the caption's word pieces of their cosine with their best region)"
        )
        if penalty is not None:
            text += f" &minus; {penalty:g} &times; the hit's hub statistic (how close it lies to many training items)"
        return text
    if ranking == "MrSw":
        return "score = TERAN MrSw alignment: each caption word piece's cosine with its best region, summed"
    if ranking == "first stage":
        return "score = global-vector cosine (not re-ranked)"
    return f"score: {html.escape(ranking)}" if ranking else "score: re-rank score of the search service"


@lru_cache(maxsize=4)
def _font(size: int):
    try:
        return ImageFont.truetype("DejaVuSans-Bold.ttf", size)  # what Chromium uses for sans-serif on Debian
    except OSError:
        return None


def text_width(text: str, size: int = LABEL_FONT) -> float:
    """Rendered width of bold label text in pixels (measured with DejaVu Sans Bold, else estimated).
    The SVG forces the text to this width (textLength), so placement never depends on the browser's font."""
    font = _font(size)
    if font is not None:
        return float(font.getlength(text))
    return sum(0.35 if ch in "ijlrtf.,' " else 0.95 if ch in "mwMW" else 0.7 for ch in text) * size


def fit_label(text: str, max_width: float, size: int = LABEL_FONT) -> str:
    """The label text, cut with an ellipsis when it would be wider than max_width (padding included)."""
    if text_width(text, size) + 2 * LABEL_PAD <= max_width:
        return text
    while text and text_width(text + "…", size) + 2 * LABEL_PAD > max_width:
        text = text[:-1]
    return text.rstrip(", ") + "…"


def _overlaps(a: Rect, b: Rect, gap: float) -> bool:
    return a[0] < b[0] + b[2] + gap and b[0] < a[0] + a[2] + gap and a[1] < b[1] + b[3] + gap and b[1] < a[1] + a[3] + gap


def _overlap_area(a: Rect, b: Rect) -> float:
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)


def _candidates(box: tuple[float, float, float, float], w: float, h: float, width: float, height: float) -> Iterator[tuple[float, float]]:
    """Label positions for a box in order of preference: on its top edge (just above it, so that the
    region itself stays visible), inside its top, below it, inside its bottom, then slid down and up
    along the box, then anywhere in the photo, nearest first. Left-aligned with the box, then right."""
    x1, y1, x2, y2 = box
    inset = STROKE / 2
    left, right = x1 - inset, x2 + inset - w
    for y in (y1 - h - inset, y1 + inset, y2 + inset, y2 - inset - h):
        yield left, y
        yield right, y
    step = h + 2
    for k in range(1, int(height // step) + 1):
        for y in (y1 + inset + k * step, y1 + inset - k * step):
            yield left, y
            yield right, y
    anywhere = [(float(x), float(y)) for y in range(0, int(height - h) + 1, 4) for x in range(0, int(width - w) + 1, 8)]
    yield from sorted(anywhere, key=lambda p: (p[0] - x1) ** 2 + (p[1] - y1) ** 2)


def place_labels(
    boxes: Sequence[tuple[float, float, float, float]], sizes: Sequence[tuple[float, float]], width: float, height: float, gap: float = 2
) -> list[Rect]:
    """Greedy label placement: for each box (pixels x1, y1, x2, y2; in priority order) and its label
    size (w, h), the first candidate position (see _candidates), moved inside the photo, that keeps
    `gap` pixels from every label placed before it. Returns one (x, y, w, h) per label; a label
    wider or taller than the photo is shrunk to it. Only when no free position exists at all (far more
    labels than the photo holds) does a label take the position of least overlap."""
    placed: list[Rect] = []
    for box, (w, h) in zip(boxes, sizes, strict=True):
        w, h = min(w, width), min(h, height)
        best, best_overlap = None, float("inf")
        for x, y in _candidates(box, w, h, width, height):
            rect = (min(max(x, 0.0), width - w), min(max(y, 0.0), height - h), w, h)
            if not any(_overlaps(rect, other, gap) for other in placed):
                best = rect
                break
            overlap = sum(_overlap_area(rect, other) for other in placed)
            if overlap < best_overlap:
                best, best_overlap = rect, overlap
        placed.append(best)
    return placed


def _leader(rect: Rect, box: tuple[float, float, float, float]) -> tuple[float, float, float, float] | None:
    """A line from the label to the nearest point of its box's outline, when the label does not touch the box."""
    x, y, w, h = rect
    x1, y1, x2, y2 = box
    if x <= x2 and x + w >= x1 and y <= y2 + 1.5 and y + h >= y1 - 1.5:
        return None
    lx, ly = min(max((x1 + x2) / 2, x), x + w), min(max((y1 + y2) / 2, y), y + h)  # label point nearest the box centre
    bx, by = min(max(lx, x1), x2), min(max(ly, y1), y2)
    return lx, ly, bx, by


def _image_data(path: Path) -> tuple[str, int, int]:
    with Image.open(path) as image:
        size = image.size
    mime = mimetypes.guess_type(path.name)[0] or "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}", *size


def photo_svg(path: Path, groups: list[Group], width: int = PHOTO_WIDTH) -> str:
    """The photo at `width` pixels (its aspect ratio kept: the model squashes it, boxes are fractions of
    the whole photo) with one box and one label per group, coloured COLOURS[i] for groups[i]."""
    href, natural_w, natural_h = _image_data(path)
    height = round(width * natural_h / natural_w)
    drawn = [(i, g) for i, g in enumerate(groups) if g.box is not None]
    boxes = [(g.box[0] * width, g.box[1] * height, g.box[2] * width, g.box[3] * height) for _, g in drawn]
    texts = [fit_label(g.label, width) for _, g in drawn]
    rects = place_labels(boxes, [(text_width(t) + 2 * LABEL_PAD, LABEL_HEIGHT) for t in texts], width, height)
    outlines, labels = [], []
    for (index, group), (x1, y1, x2, y2), text, rect in zip(drawn, boxes, texts, rects, strict=True):
        colour = COLOURS[index % len(COLOURS)]
        w, h = x2 - x1, y2 - y1
        outlines.append(
            f'<rect x="{x1:.1f}" y="{y1:.1f}" width="{w:.1f}" height="{h:.1f}" fill="none" stroke="#fff" stroke-opacity="0.8" '
            f'stroke-width="{STROKE + 2}"/>'
            f'<rect class="box" x="{x1:.1f}" y="{y1:.1f}" width="{w:.1f}" height="{h:.1f}" fill="none" stroke="{colour}" '
            f'stroke-width="{STROKE}"/>'
        )
        line = _leader(rect, (x1, y1, x2, y2))
        leader = (
            f'<line x1="{line[0]:.1f}" y1="{line[1]:.1f}" x2="{line[2]:.1f}" y2="{line[3]:.1f}" stroke="{colour}" stroke-width="2"/>'
            if line
            else ""
        )
        x, y, lw, lh = rect
        labels.append(
            f'<g class="label" data-region="{group.region}">{leader}'
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{lw:.1f}" height="{lh:.1f}" rx="3" fill="{colour}" stroke="#fff" stroke-width="1"/>'
            f'<text x="{x + LABEL_PAD:.1f}" y="{y + lh - 5.5:.1f}" font-size="{LABEL_FONT}" font-weight="bold" fill="#fff" '
            f'textLength="{lw - 2 * LABEL_PAD:.1f}" lengthAdjust="spacingAndGlyphs">{html.escape(text)}</text></g>'
        )
    return (
        f'<svg class="photo" width="{width}" height="{height}" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg" '
        f'font-family="DejaVu Sans, Verdana, sans-serif">'
        f'<image href="{href}" width="{width}" height="{height}" preserveAspectRatio="none"/>{"".join(outlines)}{"".join(labels)}</svg>'
    )


def word_list(groups: list[Group]) -> str:
    """The shown words with their similarity, each in its box's colour, most similar first."""
    items = []
    for index, group in enumerate(groups):
        colour = COLOURS[index % len(COLOURS)] if group.box is not None else "#555"
        items += [(m.similarity, m.word, colour) for m in group.matches]
    items.sort(key=lambda item: -item[0])
    spans = "".join(
        f'<span class="word" style="color:{colour};border-color:{colour}">{html.escape(word)} <b>{similarity:.2f}</b></span>'
        for similarity, word, colour in items
    )
    return f'<div class="words">{spans}</div>' if spans else '<div class="words none">no word explanations</div>'


STYLE = f"""
body{{font-family:"DejaVu Sans",Verdana,sans-serif;margin:{PAGE_MARGIN}px;color:#222;background:#fff;font-size:14px;line-height:1.35}}
h1{{font-size:24px;margin:0 0 8px}}
h2{{font-size:19px;margin:30px 0 4px}}
p.lead{{margin:4px 0;max-width:{PAGE_WIDTH - 2 * PAGE_MARGIN}px}}
p.how{{margin:0 0 10px;color:#555;font-size:13px}}
.row{{display:flex;gap:{GAP}px;flex-wrap:wrap;align-items:flex-start}}
.hit{{width:{PHOTO_WIDTH}px;margin:0}}
.hit svg{{display:block}}
.hit .head{{margin-top:6px;font-size:15px}}
.hit .score{{color:#444;font-size:13px}}
.hit .caption{{font-style:italic;color:#333;margin-top:4px}}
.words{{display:flex;flex-wrap:wrap;gap:4px;margin-top:5px}}
.words .word{{border:1.5px solid;border-radius:4px;padding:0 5px;font-size:14px;background:#fafafa}}
.words.none{{color:#777;font-style:italic}}
ol.captions{{margin:0;padding-left:28px;max-width:{PAGE_WIDTH - 2 * PAGE_MARGIN - PHOTO_WIDTH - GAP - 40}px}}
ol.captions li{{margin-bottom:8px;font-size:15px}}
ol.captions .score{{color:#444;font-size:13px}}
.own{{color:#1e8a3c;font-weight:bold}}
"""


def _caption_section(section: Section, data) -> list[str]:
    parts = [
        f"<section><h2>Caption query: &ldquo;{html.escape(section.query)}&rdquo;</h2>",
        f"<p class='how'>{describe_ranking(section.ranking)}. Boxes: where each word of the query matched in the photo.</p>",
        "<div class='row'>",
    ]
    for place, hit in enumerate(section.hits, 1):
        caption = data.captions[data.names.index(hit.id)][0]
        groups = group_by_region(hit.strongest_matches(SHOWN_WORDS))
        parts.append(
            f"<figure class='hit'>{photo_svg(data.root / 'images' / hit.id, groups)}<figcaption>"
            f"<div class='head'><b>{place}.</b> {html.escape(hit.id)}</div>"
            f"<div class='score'>score <b>{hit.score:.3f}</b> (first stage {hit.first_stage:.3f})</div>"
            f"{word_list(groups)}<div class='caption'>{html.escape(caption)}</div></figcaption></figure>"
        )
    parts.append("</div></section>")
    return parts


def _image_section(section: Section, data) -> list[str]:
    # For photo queries the alignment boxes lie on the query photo: show the best caption's words there.
    hits = section.hits
    groups = group_by_region(hits[0].strongest_matches(SHOWN_WORDS)) if hits else []
    own_caption = data.captions[data.names.index(section.query)][0] if section.query in data.names else ""
    parts = [
        f"<section><h2>Photo query: {html.escape(section.query)}</h2>",
        f"<p class='how'>{describe_ranking(section.ranking)}. Boxes: where each word of caption 1 matched in the query photo.</p>",
        "<div class='row'>",
        f"<figure class='hit'>{photo_svg(data.root / 'images' / section.query, groups)}<figcaption>"
        f"<div class='head'>query photo; words of caption 1:</div>{word_list(groups)}"
        + (f"<div class='caption'>{html.escape(own_caption)}</div>" if own_caption else "")
        + "</figcaption></figure><ol class='captions'>",
    ]
    for hit in hits:
        owner, number = hit.id.split("#")
        caption = data.captions[data.names.index(owner)][int(number)]
        own = " <span class='own'>(its own caption)</span>" if owner == section.query else ""
        parts.append(
            f"<li>{html.escape(caption)}{own}<br><span class='score'>score <b>{hit.score:.3f}</b> "
            f"(first stage {hit.first_stage:.3f}) &middot; {html.escape(hit.id)}</span></li>"
        )
    parts.append("</ol></div></section>")
    return parts


def write_contact_sheet(path: Path, sections: Iterable[Section | tuple], data, title: str = "Flickr8k dev photos") -> Path:
    """Write the page. sections: Section, or (kind, query, hits[, ranking]) tuples. data: names,
    captions (5 per photo) and root (photos under root/images), as teran.data.flickr8k's splits."""
    sections = [s if isinstance(s, Section) else Section(*s) for s in sections]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>TERAN search demo</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>TERAN cross-modal search: {html.escape(title)}</h1>",
        "<p class='lead'>First stage: cosine of the global vectors; final order: the re-rank score below. "
        "Boxes: for each content word of the caption side (stop words left out), the photo region most similar to it "
        "(a cell of the model's 7&times;7 grid); words that matched the same region share one box and one label. "
        f"Similarity: {SIMILARITY_SCALE} (higher is closer; compare the words of one photo).</p>",
    ]
    for section in sections:
        parts += _caption_section(section, data) if section.kind == "caption" else _image_section(section, data)
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
