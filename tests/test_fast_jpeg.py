"""decode="fast" through libjpeg-turbo (simplejpeg): which files it takes, and that it refuses what it must."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from sklearn.datasets import load_sample_images

from reinforce_loaders import jpeg as fast_jpeg
from reinforce_loaders.errors import SourceError, SourceMismatchError
from reinforce_loaders.source import decode_crop, decode_image

pytestmark = pytest.mark.skipif(not fast_jpeg.available(), reason="simplejpeg (the [fast] extra) is not installed")

PHOTO = load_sample_images().images[0][40:340, 60:460]  # 300 x 400, real
BOX = (20.0, 30.0, 240.0, 300.0)  # top, left, height, width: downscaled 2x to 112 px


def save(path, image: Image.Image, **options) -> str:
    image.save(path, **options)
    return str(path)


def test_plain_jpeg_is_decoded_reduced_and_close_to_the_exact_crop(tmp_path):
    path = save(tmp_path / "a.jpg", Image.fromarray(PHOTO), quality=90)
    header = fast_jpeg.read_header(open(path, "rb").read())
    assert (header.height, header.width, header.colorspace, header.plain) == (300, 400, "YCbCr", True)
    crop = decode_crop(path, BOX, 112)
    full = decode_image(path)
    exact = torch.nn.functional.interpolate(full[None, :, 20:260, 30:330].float(), size=(112, 112), mode="bilinear",
                                            antialias=True)[0]
    assert crop.shape == (3, 112, 112) and crop.dtype == torch.uint8
    assert (crop.float() - exact).abs().mean() < 3


def test_exif_rotation_cmyk_png_and_damaged_files_go_to_the_full_decode(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: Pillow's path transposes it, so the fast path must not take it
    rotated = save(tmp_path / "r.jpg", Image.fromarray(PHOTO), quality=90, exif=exif.tobytes())
    cmyk = save(tmp_path / "c.jpg", Image.fromarray(PHOTO).convert("CMYK"), quality=90)
    png = save(tmp_path / "p.png", Image.fromarray(PHOTO))
    good = open(save(tmp_path / "g.jpg", Image.fromarray(PHOTO), quality=90), "rb").read()
    damaged = tmp_path / "d.jpg"
    damaged.write_bytes(good[:len(good) // 2])
    assert fast_jpeg.read_header(open(rotated, "rb").read()).has_app1
    for path in (rotated, cmyk, png, damaged):
        assert decode_crop(path, BOX, 112) is None, path
    assert decode_image(rotated).shape == (3, 400, 300)  # the full decode honours the orientation
    with pytest.raises(SourceError, match="d.jpg"):
        decode_image(damaged)


def test_size_mismatch_and_bombs_are_refused_from_the_header(tmp_path, monkeypatch):
    path = save(tmp_path / "a.jpg", Image.fromarray(PHOTO), quality=90)
    with pytest.raises(SourceMismatchError, match="300 x 400 pixels but the store was built from one of 300 x 399"):
        decode_crop(path, BOX, 112, expected_size=(300, 399))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 400 - 1)
    with pytest.raises(SourceError, match="over the limit of 119,999 pixels"):
        decode_crop(path, BOX, 112)


def test_app1_detection_walks_markers_not_bytes():
    plain = io.BytesIO()
    Image.fromarray(PHOTO).save(plain, "JPEG", quality=90, comment=b"\xff\xe1 looks like APP1 inside a comment")
    assert not fast_jpeg.read_header(plain.getvalue()).has_app1
    assert fast_jpeg.read_header(b"\x89PNG\r\n\x1a\n") is None
    with_xmp = io.BytesIO()
    Image.fromarray(PHOTO).save(with_xmp, "JPEG", quality=90, xmp=b"<x:xmpmeta/>")
    assert fast_jpeg.read_header(with_xmp.getvalue()).has_app1
    assert np.asarray(fast_jpeg.decode_scaled(plain.getvalue(), fast_jpeg.read_header(plain.getvalue()), 4)).shape \
        == (75, 100, 3)


def test_a_jpeg_the_fast_path_declines_is_read_from_disk_once_and_decoded_as_pillow_does(tmp_path, monkeypatch):
    import builtins

    progressive = save(tmp_path / "p.jpg", Image.fromarray(PHOTO), quality=90, progressive=True)
    rotated = save(tmp_path / "r.jpg", Image.fromarray(PHOTO), quality=90, exif=_rotation(6))
    opened = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    for path in (progressive, rotated):
        decoded = decode_image(path)
        with Image.open(path) as image:
            expected = torch.from_numpy(np.asarray(ImageOps.exif_transpose(image).convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(decoded, expected), path
    assert opened.count(progressive) == 2 and opened.count(rotated) == 2  # decode_image's read + the check here


def _rotation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()
