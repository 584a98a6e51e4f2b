"""Image decoding and Bunny's preprocessing (pad to square, bicubic, normalise)."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from bunny_backend.io.image import ImageError, decode_image, expand_to_square, preprocess_image
from bunny_backend.tools.reference import reference_pixels
from image_bytes import encode, png_header_only

GREY = (127 / 255 - 0.5) / 0.5


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))             # left half red, right half blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6                                    # "rotate 90 degrees clockwise to display"
    out = np.asarray(decode_image(encode(img, "JPEG", quality=95, exif=exif)))
    assert out.shape == (40, 20, 3)                     # upright: taller than wide
    top, bottom = out[:15].mean(axis=(0, 1)), out[25:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60                 # the stored left (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_composited_on_white(mode):
    img = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    img.putpixel((0, 0), (200, 10, 10, 255))
    if mode == "LA":
        img = img.convert("LA")
    elif mode == "P":
        img = Image.new("P", (2, 1), 0)
        img.putpalette([0, 0, 0, 200, 10, 10])
        img.putpixel((0, 0), 1)
        img.info["transparency"] = 0
    out = decode_image(encode(img))
    assert out.mode == "RGB"
    assert out.getpixel((1, 0)) == (255, 255, 255)
    expected = (200, 10, 10) if mode != "LA" else (img.getpixel((0, 0))[0],) * 3
    assert out.getpixel((0, 0)) == expected


def test_greyscale_palette_and_16bit_become_rgb():
    assert decode_image(encode(Image.new("L", (3, 3), 77))).getpixel((1, 1)) == (77, 77, 77)
    pal = Image.new("RGB", (3, 3), (10, 120, 230)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert decode_image(encode(pal)).getpixel((0, 0)) == (10, 120, 230)
    deep = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert decode_image(encode(deep)).getpixel((0, 0)) == (255, 255, 255)


def test_pad_to_square_and_normalise_exactly():
    wide = Image.new("RGB", (4, 1), (255, 255, 255))
    pixels = preprocess_image(wide, 4)                  # same size: the resize keeps values exact
    assert pixels.shape == (3, 4, 4) and pixels.dtype == torch.float32
    rows = pixels[:, :, 0]                              # one column; rows are 0..3
    assert torch.allclose(rows[:, 1], torch.ones(3))    # (4 - 1) // 2 = 1 grey row above the image
    for r in (0, 2, 3):
        assert torch.allclose(rows[:, r], torch.full((3,), GREY))
    tall = expand_to_square(Image.new("RGB", (2, 4), (0, 0, 0)))
    assert [tall.getpixel((x, 0)) for x in range(4)] == [(127,) * 3, (0,) * 3, (0,) * 3, (127,) * 3]


def test_preprocess_resizes_bicubic_into_range(test_images):
    img = decode_image(test_images[1])                  # 600x400 coffee
    pixels = preprocess_image(img, 56)
    assert pixels.shape == (3, 56, 56)
    assert pixels.min() >= -1 and pixels.max() <= 1
    expected = np.asarray(expand_to_square(img).resize((56, 56), Image.Resampling.BICUBIC), np.float32)
    assert torch.allclose(pixels, torch.from_numpy(expected / 127.5 - 1).permute(2, 0, 1), atol=1e-6)
    assert torch.allclose(pixels[:, 0], torch.full((3, 56), GREY), atol=1e-6)   # top band is padding


@pytest.mark.parametrize("size", [384, 56])
def test_preprocess_equals_transformers_siglip_processor(test_images, size):
    """A second implementation: Bunny's expand2square, then transformers' SiglipImageProcessor (the PIL one)."""
    theirs = reference_pixels(test_images, size)
    ours = torch.stack([preprocess_image(decode_image(data), size) for data in test_images])
    assert theirs.shape == ours.shape == (len(test_images), 3, size, size)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("data, words", [
    (b"", "empty"),
    (b"hello, this is text", "not a readable image"),
    (png_header_only(20000, 20000), "too large"),
    (png_header_only(10000, 10000), "10000x10000"),
])
def test_bad_input_raises_image_error(data, words):
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # no Pillow warning may escape either
        with pytest.raises(ImageError, match=words):
            decode_image(data)


def test_truncated_jpeg(test_images):
    jpeg = encode(decode_image(test_images[0]), "JPEG")
    with pytest.raises(ImageError, match="truncated|damaged"):
        decode_image(jpeg[: len(jpeg) // 2])

