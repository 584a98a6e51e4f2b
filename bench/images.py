"""The images the engine bench sends: the one synthetic image for every request (the default, which a prefix cache
turns into a near-total hit), or with `Workload.distinct_images` a different image in each request, as real traffic
has, where only Bunny's system prompt is shared (issue #29).

A distinct image is request i's variant of a base photo (skimage's, where scikit-image is installed, else the
synthetic gradient): a crop, a flip and a colour shift chosen from i, and i itself written into the corner pixels,
so no two requests of a run share an image's bytes (nor its hash, nor its features in the encoder cache).
"""
from __future__ import annotations

import io

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")


def base_images() -> list:
    """PIL images: the skimage photos, or the synthetic gradient where skimage is not installed."""
    from PIL import Image
    try:
        import skimage.data
        from pathlib import Path
        folder = Path(skimage.data.__file__).parent
        return [Image.open(folder / name).convert("RGB") for name in PHOTOS]
    except (ImportError, OSError):
        from bunny_client.perf import synthetic_image
        return [Image.open(io.BytesIO(synthetic_image())).convert("RGB")]


def distinct_image(i: int, bases: list, size: int = 384) -> bytes:
    """Request i's image: PNG bytes of a size x size variant of bases[i % len(bases)]."""
    import numpy as np
    from PIL import Image
    base = bases[i % len(bases)]
    k = i // len(bases)
    w, h = base.size
    side = min(w, h) * (6 + k % 4) // 9                       # 2/3 .. whole of the short side
    x0, y0 = (k * 37) % (w - side + 1), (k * 53) % (h - side + 1)
    img = base.crop((x0, y0, x0 + side, y0 + side)).resize((size, size))
    pixels = np.asarray(img, dtype=np.int16)
    if k % 2:
        pixels = pixels[:, ::-1]
    pixels = (pixels + np.array([(k * 29) % 41 - 20, (k * 17) % 41 - 20, (k * 7) % 41 - 20])).clip(0, 255)
    pixels = pixels.astype(np.uint8)
    pixels[0, :3] = [[i >> 16 & 255, i >> 8 & 255, i & 255]] * 3   # the request's number, so none repeats
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


class RequestImages:
    """Each request's image, in the order requests are made: the workload's one image, or a new one each time."""

    def __init__(self, image: bytes, distinct: bool):
        self.image, self.distinct = image, distinct
        self.count = 0
        self._bases = base_images() if distinct else []

    def take(self, n: int) -> list[bytes]:
        if not self.distinct:
            return [self.image] * n
        out = [distinct_image(self.count + j, self._bases) for j in range(n)]
        self.count += n
        return out
