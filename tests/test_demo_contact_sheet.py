"""The demo's contact sheet: one label per region, labels that never overlap, words with similarities."""

import random
import re
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from demo.contact_sheet import (
    COLOURS,
    LABEL_HEIGHT,
    PAGE_WIDTH,
    Section,
    describe_ranking,
    fit_label,
    group_by_region,
    place_labels,
    text_width,
    write_contact_sheet,
)
from demo.results import Hit, Match
from demo.screenshot import BrowserUnavailable, find_browser, screenshot
from teran.data.flickr8k import default_data_dir


def cell(region: int, grid: int = 7) -> list[float]:
    row, col = divmod(region, grid)
    return [col / grid, row / grid, (col + 1) / grid, (row + 1) / grid]


def overlap(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def inside(rect, width, height) -> bool:
    return rect[0] >= 0 and rect[1] >= 0 and rect[0] + rect[2] <= width + 1e-6 and rect[1] + rect[3] <= height + 1e-6


def test_place_labels_puts_a_label_on_the_top_edge_of_its_box_or_inside_at_the_photo_top():
    (above,) = place_labels([(100, 100, 146, 146)], [(40, 20)], 320, 320)
    assert 97 <= above[0] <= 100 and 78 <= above[1] <= 80 and above[2:] == (40, 20)
    (top_row,) = place_labels([(100, 0, 146, 46)], [(40, 20)], 320, 320)
    assert top_row[:2] == (98.5, 0.0)  # clamped into the photo, over the top of the box
    first, second = place_labels([(100, 100, 146, 146), (100, 100, 146, 146)], [(40, 20), (40, 20)], 320, 320)
    assert first == above and second[1] == 101.5  # the second label of a box goes inside it


def test_place_labels_never_overlap_and_stay_inside_the_photo():
    rng = random.Random(0)
    for trial in range(200):
        width, height = 320, rng.choice([213, 240, 320, 427])
        count = rng.randint(1, 8)
        # Crowded: all boxes among the cells of one corner, several on the same cell, some at the edges.
        regions = [rng.choice([0, 1, 7, 8, 6, 48, 42]) if trial % 2 else rng.randrange(49) for _ in range(count)]
        boxes = [(x1 * width, y1 * height, x2 * width, y2 * height) for x1, y1, x2, y2 in map(cell, regions)]
        sizes = [(rng.uniform(30, 200), LABEL_HEIGHT) for _ in range(count)]
        rects = place_labels(boxes, sizes, width, height)
        assert len(rects) == count
        for i, rect in enumerate(rects):
            assert inside(rect, width, height), (trial, rect)
            assert rect[2:] == pytest.approx(sizes[i])
            assert not any(overlap(rect, other) for other in rects[:i]), (trial, i, rects)


def test_group_by_region_gives_one_label_per_region_strongest_first():
    matches = [
        Match("frisbee", 10, 0.5, np.array(cell(10), np.float32)),
        Match("dog", 10, 0.4, np.array(cell(10), np.float32)),
        Match("grass", 45, 0.6, np.array(cell(45), np.float32)),
        Match("jumps", 11, 0.1, np.array(cell(11), np.float32)),
    ]
    groups = group_by_region(matches)
    assert [g.label for g in groups] == ["grass", "frisbee, dog", "jumps"]
    assert [g.region for g in groups] == [45, 10, 11]
    assert group_by_region([Match("dog", 0, 0.2, np.zeros(0, np.float32))])[0].box is None


def test_fit_label_and_describe_ranking():
    assert fit_label("dog", 320) == "dog"
    long = fit_label(", ".join(["frisbee"] * 20), 320)
    assert long.endswith("…") and text_width(long) + 10 <= 320
    assert "score = global-vector cosine + 0.08 &times; TERAN alignment" in describe_ranking("blend w=0.08")
    assert "hub" not in describe_ranking("blend w=0.08")
    assert "&minus; 0.5 &times; the hit's hub statistic" in describe_ranking("blend w=0.08, hub 0.5")
    assert describe_ranking("blend w=0.08, hub x") == "score: blend w=0.08, hub x"
    assert "MrSw" in describe_ranking("MrSw") and "not re-ranked" in describe_ranking("first stage")
    assert "mystery" in describe_ranking("mystery")


@pytest.fixture
def photos():
    images = default_data_dir() / "images"
    names = sorted(p.name for p in images.glob("*.jpg"))[:3] if images.is_dir() else []
    if len(names) < 3:
        pytest.skip(f"needs three Flickr8k photos in {images}")
    captions = [[f"caption {k} of {name}" for k in range(5)] for name in names]
    return SimpleNamespace(root=default_data_dir(), names=names, captions=captions)


def synthetic_sections(data):
    def match(word, region, similarity):
        return Match(word, region, similarity, np.array(cell(region), np.float32))

    # Photo 0: dog and frisbee share region 17; black on the next cell, jumps far away. Photo 1: all on one corner.
    first = Hit(
        data.names[0],
        0.61,
        0.52,
        {},
        [match("black", 18, 0.31), match("dog", 17, 0.45), match("frisbee", 17, 0.38), match("jumps", 47, -0.05)],
    )
    second = Hit(
        data.names[1], 0.55, 0.57, {}, [match("black", 0, 0.2), match("dog", 1, 0.25), match("frisbee", 7, 0.3), match("jumps", 8, 0.1)]
    )
    captions = [Hit(f"{data.names[0]}#1", 0.7, 0.6, {}, first.matches), Hit(f"{data.names[2]}#0", 0.5, 0.4, {}, [])]
    return [
        Section("caption", "a black dog jumps to catch a frisbee", [first, second], "blend w=0.08"),
        Section("image", data.names[0], captions, "blend w=0.08"),
    ]


LABEL = re.compile(
    r'<g class="label" data-region="(\d+)">(?:<line [^>]*/>)?'
    r'<rect x="([\d.]+)" y="([\d.]+)" width="([\d.]+)" height="([\d.]+)"[^>]*fill="(#\w+)"'
)


def test_contact_sheet_one_label_per_region_no_overlap_words_with_similarity(photos, tmp_path):
    page = write_contact_sheet(tmp_path / "index.html", synthetic_sections(photos), photos).read_text()
    svgs = re.findall(r"<svg class=\"photo\".*?</svg>", page)
    assert len(svgs) == 3  # two hits and the photo query
    labels = [LABEL.findall(svg) for svg in svgs]
    assert [len(found) for found in labels] == [3, 4, 3]  # one label per distinct region
    assert [len(re.findall(r'<rect class="box"', svg)) for svg in svgs] == [3, 4, 3]
    for found, svg in zip(labels, svgs, strict=True):
        width, height = (float(v) for v in re.search(r'width="(\d+)" height="(\d+)"', svg).groups())
        rects = [tuple(float(v) for v in label[1:5]) for label in found]
        assert all(inside(r, width, height) for r in rects)
        assert not any(overlap(a, b) for i, a in enumerate(rects) for b in rects[:i])
    # The label of the shared region names both words, strongest first, in the strongest group's colour.
    assert ">dog, frisbee</text>" in svgs[0] and labels[0][0][0] == "17" and labels[0][0][5] == COLOURS[0]
    # Words listed under the photo with their similarity in their box's colour (2 decimals).
    assert f'<span class="word" style="color:{COLOURS[0]};border-color:{COLOURS[0]}">frisbee <b>0.38</b></span>' in page
    assert "jumps <b>-0.05</b>" in page and "dog <b>0.45</b>" in page
    # What the page showed before: query, rank, id, scores, captions, and the photo query's own caption.
    assert "a black dog jumps to catch a frisbee" in page and f"<b>1.</b> {photos.names[0]}" in page
    assert "score <b>0.610</b> (first stage 0.520)" in page and photos.captions[0][0] in page
    assert "caption 1 of " + photos.names[0] + " <span class='own'>(its own caption)</span>" in page
    assert "global-vector cosine + 0.08 &times; TERAN alignment" in page
    assert "mean cosine of the word's pieces and the region, -1..1" in page
    assert page.count("data:image/jpeg;base64,") == 3 and 'src="http' not in page and 'href="http' not in page


def test_contact_sheet_renders_in_a_real_browser(photos, tmp_path):
    try:
        find_browser()
    except BrowserUnavailable as error:
        pytest.skip(str(error))
    page = write_contact_sheet(tmp_path / "index.html", synthetic_sections(photos), photos)
    png = screenshot(page, tmp_path / "sheet.png", width=PAGE_WIDTH)
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] == PAGE_WIDTH and image.size[1] > 500
        counts = {rgb: n for n, rgb in image.convert("RGB").getcolors(maxcolors=1 << 24)}
    strongest = tuple(int(COLOURS[0][i : i + 2], 16) for i in (1, 3, 5))
    assert counts.get(strongest, 0) > 500  # the strongest group's box, filled label and listed word were drawn
