"""The fast PNG/JPEG header readers agree with PIL, EXIF orientation included, and fall back when unsure."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from library.data.image_headers import header_size
from library.data.images import _pil_image_size, load_image, read_image_size


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "maker"  # a tag before and after orientation in the IFD
    exif[0x0131] = "software"
    return exif.tobytes()


def _save(path: Path, size: tuple[int, int], mode: str = "RGB", **params) -> Path:
    Image.new(mode, size).save(path, **params)
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("extension", [".jpg", ".png"])
def test_header_size_matches_pil_for_every_orientation(tmp_path, orientation, extension):
    path = _save(tmp_path / f"image{extension}", (120, 70), exif=_exif(orientation))
    with open(path, "rb") as file:
        fast = header_size(file, extension)
    assert fast == _pil_image_size(str(path))
    assert fast == ((70, 120) if orientation >= 5 else (120, 70))


@pytest.mark.parametrize(
    ("name", "mode", "params"),
    [
        ("plain.png", "RGB", {}),
        ("alpha.png", "RGBA", {}),
        ("gray16.png", "I;16", {}),
        ("palette.png", "P", {}),
        ("baseline.jpg", "RGB", {}),
        ("progressive.jpeg", "RGB", {"progressive": True}),
        ("cmyk.jpg", "CMYK", {}),
        ("gray.jpg", "L", {}),
        ("icc.jpg", "RGB", {"icc_profile": b"\0" * 70000}),  # an APP2 segment larger than a read buffer
    ],
)
def test_header_size_matches_pil_for_common_variants(tmp_path, name, mode, params):
    path = _save(tmp_path / name, (33, 17), mode, **params)
    with open(path, "rb") as file:
        assert header_size(file, path.suffix) == _pil_image_size(str(path)) == (33, 17)


def test_jpeg_orientation_read_after_an_xmp_segment():
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20)).save(buffer, "JPEG", exif=_exif(8))
    data = buffer.getvalue()
    xmp = b"http://ns.adobe.com/xap/1.0/\x00<x/>"
    data = data[:2] + b"\xff\xe1" + (len(xmp) + 2).to_bytes(2, "big") + xmp + data[2:]
    assert header_size(io.BytesIO(data), ".jpg") == (20, 40)


def test_unknown_or_broken_headers_fall_back_to_pil(tmp_path):
    assert header_size(io.BytesIO(b"\xff\xd8\xff"), ".jpg") is None
    assert header_size(io.BytesIO(b"GIF89a"), ".png") is None
    disguised = tmp_path / "really_a_jpeg.png"
    disguised.write_bytes((_save(tmp_path / "x.jpg", (21, 13))).read_bytes())
    assert read_image_size(str(disguised)) == (21, 13)
    assert read_image_size(str(_save(tmp_path / "y.webp", (9, 5)))) == (9, 5)


def test_loaded_image_is_upright_like_its_header_size(tmp_path):
    path = _save(tmp_path / "turned.jpg", (60, 30), exif=_exif(6))
    height, width = load_image(str(path)).shape[:2]
    assert (width, height) == read_image_size(str(path)) == (30, 60)
