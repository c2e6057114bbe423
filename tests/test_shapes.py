"""The shapes world: exact geometry, deterministic files, captions, and a held-out set that
training never sees."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from ldm.shapes.world import (
    CANONICAL,
    COLORS,
    HELDOUT,
    POSITIONS,
    SIZES,
    TEMPLATES,
    ShapeSpec,
    all_combinations,
    make_shapes,
    read_specs,
    render,
    sample_specs,
    vocabulary,
)


def _pixels_of(image, color) -> int:
    return int((np.asarray(image) == np.array(COLORS[color])).all(-1).sum())


@pytest.mark.parametrize("size", ["small", "large"])
def test_a_square_covers_exactly_its_box_and_a_circle_pi_over_4(size):
    side = SIZES[size]
    square = render(ShapeSpec("square", "red", size, "in the center", "blue", dx=1, dy=-2))
    assert _pixels_of(square, "red") == side * side  # integer centre and even side: exact
    assert _pixels_of(square, "blue") == 64 * 64 - side * side
    rgb = np.asarray(render(ShapeSpec("circle", "white", size, "at the top left", "black")))
    coverage = (rgb.astype(float) - COLORS["black"]) / (np.array(COLORS["white"]) - COLORS["black"])
    assert coverage.mean(-1).sum() == pytest.approx(math.pi / 4 * side * side, rel=0.02)
    triangle = np.asarray(render(ShapeSpec("triangle", "white", size, "at the top", "black")))
    covered = ((triangle.astype(float) - 15) / 230).mean(-1).sum()
    assert covered == pytest.approx(side * side / 2, rel=0.05)


def test_every_shape_stays_inside_the_image_with_the_largest_jitter():
    for position in POSITIONS:
        for dx in (-2, 2):
            spec = ShapeSpec("square", "red", "large", position, "blue", dx=dx, dy=dx)
            rgb = np.asarray(render(spec))
            assert _pixels_of(rgb, "red") == 28 * 28, position  # nothing clipped at the edge


def test_combinations_and_the_held_out_set():
    combos = all_combinations()
    assert len(combos) == 3 * 8 * 2 * 9 * 7 == len(set(combos))
    assert len(HELDOUT) == 150 and HELDOUT <= set(combos)
    train = sample_specs(3000, seed=0)
    assert not {s.combination for s in train} & HELDOUT
    heldout = sample_specs(300, seed=0, split="heldout")
    assert {s.combination for s in heldout} <= HELDOUT
    assert {max(abs(s.dx), abs(s.dy)) for s in train} == {0, 1, 2}


def test_captions_name_every_attribute_in_every_template():
    spec = ShapeSpec("triangle", "purple", "small", "at the bottom right", "yellow")
    assert spec.caption() == "a small purple triangle at the bottom right on a yellow background"
    assert spec.caption() == spec.caption(CANONICAL)
    words = set(vocabulary())
    for template in TEMPLATES:
        caption = spec.caption(template)
        for value in ("triangle", "purple", "small", "at the bottom right", "yellow"):
            assert value in caption, (template, value)
        assert set(caption.replace(",", " , ").split()) <= words


def test_make_shapes_is_deterministic_and_never_overwrites(tmp_path):
    a = make_shapes(12, tmp_path / "a", seed=3)
    b = make_shapes(12, tmp_path / "b", seed=3)
    c = make_shapes(12, tmp_path / "c", seed=4)
    rows = [json.loads(line) for line in (a / "metadata.jsonl").read_text().splitlines()]
    assert (a / "metadata.jsonl").read_text() == (b / "metadata.jsonl").read_text()
    assert (a / "metadata.jsonl").read_text() != (c / "metadata.jsonl").read_text()
    assert all((a / r["file_name"]).read_bytes() == (b / r["file_name"]).read_bytes() for r in rows)
    assert {"file_name", "text", "shape", "color", "size", "position", "background"} <= set(rows[0])
    pairs = read_specs(a)
    assert len(pairs) == 12
    for path, spec in pairs:  # the files hold exactly the renders of their specs
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(render(spec)))
    before = sorted(p.name for p in a.iterdir())
    with pytest.raises(FileExistsError, match=r"--out .*a is not empty"):
        make_shapes(5, a)
    assert sorted(p.name for p in a.iterdir()) == before


def test_bad_specs_name_the_value_and_what_is_allowed():
    with pytest.raises(ValueError, match="shape 'hexagon' is not allowed; use one of: circle"):
        ShapeSpec("hexagon", "red", "small", "in the center", "blue")
    with pytest.raises(ValueError, match="background must differ"):
        ShapeSpec("circle", "red", "small", "in the center", "red")
    with pytest.raises(ValueError, match="jitter"):
        ShapeSpec("circle", "red", "small", "in the center", "blue", dx=3)
    with pytest.raises(ValueError, match="split 'test' is not allowed"):
        sample_specs(3, split="test")
