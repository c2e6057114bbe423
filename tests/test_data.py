"""ldm.data: sources, bad-sample handling, conversions and transforms, on tiny files in tmp_path."""

import io
import json
import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from ldm.data import DataConfig, ImageCaptionDataset, load_image, scan, transform_image

RED, BLUE = (255, 0, 0), (0, 0, 255)


def rgb(w: int, h: int, color: tuple[int, int, int] = (200, 100, 50)) -> Image.Image:
    return Image.new("RGB", (w, h), color)


def noise_png_bytes(seed: int = 0) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def gradient(w: int = 100, h: int = 50) -> Image.Image:
    """Red channel = 2 * column index (0..198), so every column is recognisable."""
    array = np.zeros((h, w, 3), np.uint8)
    array[..., 0] = (np.arange(w) * 2)[None, :]
    return Image.fromarray(array)


def write_jsonl(path, rows: list) -> None:
    """rows: dicts, or raw bytes lines written as they are."""
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]
    path.write_bytes(b"\n".join(lines) + b"\n")


# Sample id -> words that its skip reason must contain.
EXPECTED_SKIPPED = {
    "corrupt.png": "corrupt image",
    "truncated.jpg": "truncated image",
    "empty.png": "empty file (0 bytes)",
    "not_an_image.png": "not an image",
    "no_caption.png": "missing caption",
    "blank_caption.png": "empty caption",
    "latin1_caption.png": "caption is not UTF-8",
    "../outside.png": "outside the dataset folder",
    "missing.png": "file not found",
    "metadata.jsonl line 19": "not valid JSON",
}


@pytest.fixture
def messy(tmp_path):
    """A metadata.jsonl folder with good images, one of each bad kind and each conversion."""
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    rgb(96, 72).save(root / "good_96x72.jpg")
    rgb(64, 64).save(root / "good_64.png")
    gradient(128, 64).save(root / "sub" / "good_128x64.png")

    rgba = np.zeros((64, 64, 4), np.uint8)  # left half transparent black, right half blue
    rgba[:, 32:] = (0, 0, 255, 255)
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    la = np.zeros((64, 64, 2), np.uint8)  # transparent black everywhere
    Image.fromarray(la, "LA").save(root / "la.png")
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(1, (32, 0, 64, 64))
    palette.save(root / "palette.png", transparency=0)  # index 0 (left half) transparent
    Image.new("L", (64, 64), 100).save(root / "gray.png")
    gray16 = np.full((64, 64), 32768, np.uint16)
    gray16[:, :32] = 65535
    Image.fromarray(gray16).save(root / "gray16.png")  # mode I;16
    rotated = rgb(40, 20, BLUE)
    rotated.paste(RED, (0, 0, 20, 20))  # red left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated.save(root / "rotated.jpg", exif=exif.tobytes())
    rgb(30, 20).save(root / "small.png")

    good = Image.new("RGB", (64, 64), (10, 20, 30))
    for name in ("no_caption.png", "blank_caption.png", "latin1_caption.png"):
        good.save(root / name)
    (tmp_path / "outside.png").write_bytes((root / "good_64.png").read_bytes())
    png = noise_png_bytes()
    corrupt = bytearray(png)
    corrupt[60:200] = bytes(140)
    (root / "corrupt.png").write_bytes(bytes(corrupt))
    jpeg = (root / "good_96x72.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "not_an_image.png").write_text("just some text, not a PNG\n")

    rows = [
        {"file_name": "good_96x72.jpg", "text": "a wide photo"},
        {"file_name": "good_64.png", "text": "  a square  "},
        {"file_name": "sub/good_128x64.png", "text": "a gradient"},
        {"file_name": "rgba.png", "text": "half transparent"},
        {"file_name": "la.png", "text": "transparent gray"},
        {"file_name": "palette.png", "text": "palette"},
        {"file_name": "gray.png", "text": "gray"},
        {"file_name": "gray16.png", "text": "sixteen bits"},
        {"file_name": "rotated.jpg", "text": "rotated"},
        {"file_name": "small.png", "text": "small"},
        {"file_name": "corrupt.png", "text": "corrupt"},
        {"file_name": "truncated.jpg", "text": "truncated"},
        {"file_name": "empty.png", "text": "empty"},
        {"file_name": "not_an_image.png", "text": "text file"},
        {"file_name": "no_caption.png"},
        {"file_name": "blank_caption.png", "text": " \t "},
        b'{"file_name": "latin1_caption.png", "text": "caf\xe9"}',
        {"file_name": "../outside.png", "text": "escapes"},
        b"{not json",
        {"file_name": "missing.png", "text": "gone"},
        {"file_name": str(tmp_path / "outside.png"), "text": "absolute escape"},
    ]
    write_jsonl(root / "metadata.jsonl", rows)
    return root


def test_report_lists_exactly_the_bad_samples_and_the_conversions(messy, tmp_path):
    report = scan(DataConfig(str(messy), resolution=64))
    outside_abs = str(tmp_path / "outside.png")
    skipped = dict(report.skipped)
    assert set(skipped) == {*EXPECTED_SKIPPED, outside_abs}
    for sample_id, words in EXPECTED_SKIPPED.items():
        assert words in skipped[sample_id], (sample_id, skipped[sample_id])
    assert "outside the dataset folder" in skipped[outside_abs]

    assert sorted(report.converted) == sorted(
        [
            ("rgba.png", "transparency (RGBA) composited on white"),
            ("la.png", "transparency (LA) composited on white"),
            ("palette.png", "transparency (P) composited on white"),
            ("gray.png", "grayscale -> RGB"),
            ("gray16.png", "I;16 -> 8-bit"),
            ("gray16.png", "grayscale -> RGB"),
            ("rotated.jpg", "EXIF orientation 6 applied"),
            ("rotated.jpg", "upscaled from 20x40"),
            ("small.png", "upscaled from 30x20"),
        ]
    )
    assert report.total == 21 and report.used == 10 and len(report.skipped) == 11
    assert report.used + len(report.skipped) == report.total
    assert report.upscaled == 2
    # Shorter sides: 72, 64 x7, 20 (rotated 20x40), 20 (small 30x20).
    assert report.size_histogram == {"16-31": 2, "64-127": 8}
    captions = {s.id: s.caption for s in report.samples}
    assert captions["good_64.png"] == "a square"  # stripped
    assert captions["sub/good_128x64.png"] == "a gradient"


def test_every_item_is_a_3xRxR_float_tensor_in_range(messy):
    config = DataConfig(str(messy), resolution=64)
    report = scan(config)
    dataset = ImageCaptionDataset(config, report.samples)
    assert len(dataset) == 10
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["index"] == i and item["caption"] == report.samples[i].caption
        pixels = item["pixels"]
        assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
        assert pixels.min() >= -1.0 and pixels.max() <= 1.0


def test_conversions_give_the_right_pixels(messy):
    config = DataConfig(str(messy), resolution=64)
    dataset = ImageCaptionDataset(config, scan(config).samples)
    items = {dataset.samples[i].id: dataset[i]["pixels"] for i in range(len(dataset))}

    rgba = items["rgba.png"]
    assert torch.equal(rgba[:, :, :32], torch.ones(3, 64, 32))  # transparent -> white
    assert torch.equal(
        rgba[:, :, 32:], torch.tensor([-1.0, -1.0, 1.0])[:, None, None].expand(3, 64, 32)
    )
    assert torch.equal(items["la.png"], torch.ones(3, 64, 64))
    palette = items["palette.png"]
    assert torch.equal(palette[:, :, :32], torch.ones(3, 64, 32))
    assert torch.equal(palette[1, :, 32:], torch.ones(64, 32))  # opaque green
    assert torch.equal(palette[0, :, 32:], -torch.ones(64, 32))

    gray = items["gray.png"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert gray[0, 0, 0].item() == pytest.approx(100 / 127.5 - 1)

    gray16 = items["gray16.png"]
    assert torch.equal(gray16[0], gray16[2])
    assert torch.equal(gray16[:, :, :32], torch.ones(3, 64, 32))  # 65535 -> white, not clipped
    assert gray16[:, :, 32:].abs().max().item() < 0.01  # 32768 -> mid gray, about 0.0


def test_exif_rotation_is_applied_before_resizing(messy):
    image, conversions = load_image(messy / "rotated.jpg")
    with Image.open(messy / "rotated.jpg") as raw:
        assert raw.size == (40, 20)
        expected = np.asarray(ImageOps.exif_transpose(raw).convert("RGB"))
    assert image.size == (20, 40)  # upright: 20 wide, 40 tall
    assert conversions == ["EXIF orientation 6 applied"]
    array = np.asarray(image).astype(int)
    assert np.array_equal(array, expected)
    top, bottom = array[5, 10], array[35, 10]
    assert top[0] > 200 and top[2] < 60  # red at the top: the left half turned clockwise
    assert bottom[2] > 200 and bottom[0] < 60


def test_centre_crop_keeps_the_centre_columns(tmp_path):
    gradient().save(tmp_path / "g.png")  # 100x50
    (tmp_path / "g.txt").write_text("gradient")
    config = DataConfig(str(tmp_path), resolution=50)
    pixels = ImageCaptionDataset(config, scan(config).samples)[0]["pixels"]
    expected = torch.arange(25, 75, dtype=torch.float32) * 2 / 127.5 - 1  # columns 25..74
    assert pixels.shape == (3, 50, 50)
    assert torch.allclose(pixels[0, 0], expected) and torch.allclose(pixels[0, 49], expected)
    assert torch.equal(pixels[1:], -torch.ones(2, 50, 50))


def test_centre_crop_downscales_the_shorter_side_to_the_resolution():
    image = gradient(100, 50)
    pixels = transform_image(image, DataConfig("unused", resolution=25))
    assert pixels.shape == (3, 25, 25)
    red = (pixels[0, 12] + 1) * 127.5  # (25,) in [0, 255]
    # Resized to 50x25, column j averages original columns 2j and 2j + 1: red = 4j + 1; the
    # centre crop starts at j = 12.
    expected = 4 * torch.arange(12, 37, dtype=torch.float32) + 1
    assert torch.allclose(red, expected, atol=1.0)


def test_random_crop_and_flip_are_reproducible_from_the_generator(tmp_path):
    gradient().save(tmp_path / "g.png")
    (tmp_path / "g.txt").write_text("gradient")
    config = DataConfig(str(tmp_path), resolution=32, center_crop=False, random_flip=True)
    samples = scan(config).samples

    def draws(seed: int) -> torch.Tensor:
        dataset = ImageCaptionDataset(config, samples, torch.Generator().manual_seed(seed))
        return torch.stack([dataset[0]["pixels"] for _ in range(12)])  # (12, 3, 32, 32)

    first, again, other = draws(0), draws(0), draws(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert len({tuple(x[0, 0, :2].tolist()) for x in first}) > 1  # crops and flips vary


def test_random_flip_mirrors_the_centre_crop():
    config = DataConfig("unused", resolution=50, random_flip=True)
    generator = torch.Generator().manual_seed(0)
    centre = transform_image(gradient(), DataConfig("unused", resolution=50))
    outs = [transform_image(gradient(), config, generator) for _ in range(16)]
    flipped = [torch.equal(x, centre.flip(-1)) for x in outs]
    assert all(f or torch.equal(x, centre) for f, x in zip(flipped, outs, strict=True))
    assert 0 < sum(flipped) < 16


def test_metadata_csv_folder(tmp_path):
    rgb(64, 64).save(tmp_path / "a.png")
    rgb(70, 64).save(tmp_path / "b.jpg")
    (tmp_path / "metadata.csv").write_text(
        'file_name,text\na.png,"a cat, sitting"\nb.jpg,"a ""quoted"" dog"\n'
    )
    report = scan(DataConfig(str(tmp_path)))
    assert [s.caption for s in report.samples] == ["a cat, sitting", 'a "quoted" dog']
    assert report.total == 2 and not report.skipped and not report.converted


def test_caption_files_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    rgb(64, 64).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red square\n")
    rgb(64, 64).save(tmp_path / "sub" / "b.jpg")
    (tmp_path / "sub" / "b.txt").write_bytes("\ufeffa café".encode())  # UTF-8 with a BOM
    rgb(64, 64).save(tmp_path / "c.png")  # no c.txt
    rgb(64, 64).save(tmp_path / "d.png")
    (tmp_path / "d.txt").write_bytes("caf\xe9".encode("latin-1"))
    report = scan(DataConfig(str(tmp_path)))
    assert [(s.id, s.caption) for s in report.samples] == [
        ("a.png", "a red square"),
        ("sub/b.jpg", "a café"),
    ]
    assert report.skipped == [
        ("c.png", "missing caption (no c.txt)"),
        ("d.png", "caption is not UTF-8"),
    ]


def test_jsonl_manifest_allows_absolute_paths_but_not_escapes(tmp_path):
    (tmp_path / "set" / "images").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    rgb(64, 64).save(tmp_path / "set" / "images" / "a.png")
    rgb(64, 64).save(tmp_path / "elsewhere" / "b.png")
    manifest = tmp_path / "set" / "train.jsonl"
    rows = [
        {"file_name": "images/a.png", "text": "relative"},
        {"file_name": str(tmp_path / "elsewhere" / "b.png"), "text": "absolute"},
        {"file_name": "../elsewhere/b.png", "text": "escape"},
    ]
    write_jsonl(manifest, rows)
    report = scan(DataConfig(str(manifest)))
    assert [s.caption for s in report.samples] == ["relative", "absolute"]
    assert len(report.skipped) == 1 and "outside the dataset folder" in report.skipped[0][1]


def test_csv_manifest_with_another_caption_column(tmp_path):
    rgb(64, 64).save(tmp_path / "a.png")
    rgb(64, 80).save(tmp_path / "b.png")
    manifest = tmp_path / "list.csv"
    manifest.write_text("file_name,caption\na.png,first\nb.png,second\n")
    config = DataConfig(str(manifest), caption_column="caption")
    report = scan(config)
    assert [s.caption for s in report.samples] == ["first", "second"]
    with pytest.raises(ValueError, match="'text'"):
        scan(DataConfig(str(manifest)))  # no 'text' column: the error names it


def test_datasets_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [rgb(64, 64, RED), Image.new("L", (64, 64), 128), rgb(80, 64), rgb(64, 64)]
    table = datasets.Dataset.from_dict(
        {"image": images, "text": ["red", "gray", "wide", "   "]}
    ).cast_column("image", datasets.Image())
    table.save_to_disk(str(tmp_path / "saved"))
    config = DataConfig(str(tmp_path / "saved"), resolution=32)
    report = scan(config)
    assert [(s.id, s.caption) for s in report.samples] == [
        ("row 0", "red"),
        ("row 1", "gray"),
        ("row 2", "wide"),
    ]
    assert report.skipped == [("row 3", "empty caption")]
    assert report.converted == [("row 1", "grayscale -> RGB")]
    item = ImageCaptionDataset(config, report.samples)[0]
    assert item["pixels"].shape == (3, 32, 32) and item["caption"] == "red"
    assert torch.equal(item["pixels"][:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))


def test_a_file_broken_after_the_scan_is_replaced_by_the_next_sample(tmp_path, caplog):
    for name in ("a", "b", "c"):
        rgb(64, 64).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(name)
    config = DataConfig(str(tmp_path))
    dataset = ImageCaptionDataset(config, scan(config).samples)
    (tmp_path / "b.png").unlink()
    with caplog.at_level(logging.WARNING, logger="ldm.data"):
        item = dataset[1]
    assert item["index"] == 2 and item["caption"] == "c"
    assert "b.png" in caplog.text and "file not found" in caplog.text
    (tmp_path / "c.png").write_bytes(b"")
    assert dataset[1]["caption"] == "a"  # wraps around


def test_report_text_and_files(messy, tmp_path):
    report = scan(DataConfig(str(messy)))
    text = report.to_text()
    skipped_part, converted_part = text.split("Converted")
    for sample_id, _ in report.skipped:
        assert sample_id in skipped_part
    assert "truncated.jpg: truncated image" in skipped_part
    assert "gray16.png: I;16 -> 8-bit" in converted_part
    assert "total 21, used 10, skipped 11" in text
    json_path, text_path = report.save(tmp_path / "report.json")
    saved = json.loads(json_path.read_text())
    assert saved["total"] == 21 and saved["used"] == 10 and saved["upscaled"] == 2
    assert len(saved["skipped"]) == 11 and len(saved["converted"]) == 9
    assert saved["skipped"][1] == {"sample": "truncated.jpg", "reason": "truncated image"}
    assert text_path == tmp_path / "report.txt" and text_path.read_text() == text
    with pytest.raises(ValueError, match=r"\.json"):
        report.save(tmp_path / "report.txt")


def test_ids_from_non_utf8_names_are_escaped(tmp_path):
    rgb(64, 64).save(tmp_path / "a.png")
    rows = [b'{"file_name": "caf\xe9.png", "text": "latin-1 name"}', {"file_name": "a.png"}]
    write_jsonl(tmp_path / "metadata.jsonl", rows)
    report = scan(DataConfig(str(tmp_path)))
    assert report.skipped[0] == ("caf\\udce9.png", "file not found")
    json_path, text_path = report.save(tmp_path / "report.json")
    assert json.loads(json_path.read_text())["skipped"][0]["sample"] == "caf\\udce9.png"
    assert "caf\\udce9.png: file not found" in text_path.read_text()


def test_errors_name_the_path_and_what_is_accepted(tmp_path):
    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        scan(DataConfig(str(missing)))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("nothing here")
    with pytest.raises(ValueError, match=r"metadata\.jsonl") as error:
        scan(DataConfig(str(tmp_path / "empty")))
    assert ".txt captions" in str(error.value) and "save_to_disk" in str(error.value)
    with pytest.raises(ValueError, match="resolution"):
        DataConfig(str(tmp_path), resolution=0)
    with pytest.raises(ValueError, match="no usable samples"):
        ImageCaptionDataset(DataConfig(str(tmp_path)), [])


def test_check_data_command_prints_the_report_and_long_captions(tmp_path, capsys):
    from ldm.cli import main

    Image.new("RGB", (80, 60), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (64, 64), (0, 0, 255)).save(tmp_path / "b.png")
    (tmp_path / "bad.png").write_text("not an image")
    rows = [
        {"file_name": "a.png", "text": "a red square " * 40},  # 3 * 40 + 2 = 122 tokens
        {"file_name": "b.png", "text": "a blue square"},
        {"file_name": "bad.png", "text": "x"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = ["--report", str(tmp_path / "report.json")]
    assert main(["check-data", str(tmp_path), "--model", "none", *report]) == 0  # CLIP's 77 tokens
    out = capsys.readouterr().out
    assert "total 3, used 2, skipped 1" in out and "bad.png: not an image" in out
    assert "captions over the text encoder's 77 tokens (truncated in training): 1 of 2" in out
    assert json.loads((tmp_path / "report.json").read_text())["skipped"] == [
        {"sample": "bad.png", "reason": "not an image (PIL cannot identify the format)"}
    ]
    config = tmp_path / "train.yaml"
    config.write_text(f"model: m\ndata:\n  path: {tmp_path}\n  resolution: 32\n")
    assert main(["check-data", str(config), "--model", "none"]) == 0  # model m is no folder
    assert "(resolution 32)" in capsys.readouterr().out
    assert main(["check-data", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
