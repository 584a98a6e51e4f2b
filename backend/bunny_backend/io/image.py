"""Image bytes -> RGB picture -> Bunny's pixel tensor (docs/api/triton-model.md, "Images")."""
from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 64_000_000               # refuse larger images before any pixel is decoded
PAD_COLOR = (127, 127, 127)            # int(0.5 * 255) per channel: SigLIP's mean, as in LLaVA's expand2square
MEAN = 0.5
STD = 0.5


class ImageError(ValueError):
    """The bytes are not a usable image; the message says why (meant for the API caller)."""


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an encoded image file into an RGB picture, upright as its EXIF orientation says."""
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    with warnings.catch_warnings():
        # Pillow's own bomb warning and EXIF/ICC chatter must not turn into crashes under -W error.
        warnings.simplefilter("ignore")
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise ImageError(f"the image is too large: more than the {max_pixels / 1e6:.0f} megapixels allowed "
                             f"({e})") from None
        except UnidentifiedImageError:
            raise ImageError(f"the data is not a readable image ({len(data)} bytes, unknown format)") from None
        except Exception as e:  # noqa: BLE001 - any parser failure is the caller's bad input
            raise ImageError(f"the image could not be read: {e}") from None
        width, height = img.size
        if width < 1 or height < 1:
            raise ImageError(f"the image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise ImageError(f"the image is {width}x{height} = {width * height / 1e6:.0f} megapixels, "
                             f"more than the {max_pixels / 1e6:.0f} megapixels allowed")
        try:
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return _to_rgb(img)
        except Exception as e:  # noqa: BLE001 - truncated or corrupt data
            raise ImageError(f"the {img.format or 'image'} file is damaged or truncated: {e}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "F"):
        # 16-bit or float greyscale: stretch to 8 bits, which convert("RGB") would only clip
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        # transparent parts become white, the usual backdrop such images are drawn for
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def expand_to_square(img: Image.Image, color: tuple[int, int, int] = PAD_COLOR) -> Image.Image:
    """Pad the shorter side with `color`, the picture centred (LLaVA's expand2square)."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    out = Image.new(img.mode, (side, side), color)
    out.paste(img, ((side - width) // 2, (side - height) // 2))
    return out


def shrink_for_square(img: Image.Image, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Scale the picture down (aspect kept) when padding it to a square would exceed `max_pixels`.

    An image within the pixel limit can still be long and thin (1 x 60M), and its padded square would not fit
    in memory. Such an image ends at the tower's size anyway, so shrinking first changes nothing that matters.
    """
    side = max(img.size)
    if side * side <= max_pixels:
        return img
    limit = max(1, int(max_pixels ** 0.5))
    scale = limit / side
    size = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
    return img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def preprocess_image(img: Image.Image, image_size: int, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """RGB picture -> float32 [3, S, S]: pad to square, bicubic resize, scale to [0, 1], normalise."""
    img = shrink_for_square(img, max_pixels)
    square = expand_to_square(img.convert("RGB") if img.mode != "RGB" else img)
    resized = square.resize((image_size, image_size), Image.Resampling.BICUBIC)
    # numpy, not torch: this runs on the server's request thread, which is to stay out of torch's thread pools
    # (stub/engine_thread.py)
    arr = (np.asarray(resized, dtype=np.float32) / 255.0 - np.float32(MEAN)) / np.float32(STD)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

