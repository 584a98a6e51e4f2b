"""The engine bench's distinct-image workload (bench/images.py): every request of a run gets an image of its own
(by the sha256 the engine keys images by), the same request number gives the same image, and a run with prefix
caching on completes on a demo checkpoint with cache hits only on the shared text, where one image for all
requests hits on the image too."""
import hashlib
import io

from PIL import Image

from bench.common import Workload
from bench.engine_direct import benchmark, make_engine, run_round
from bench.images import RequestImages, base_images, distinct_image


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_each_request_gets_its_own_image():
    images = RequestImages(b"one", distinct=True)
    taken = images.take(5) + images.take(7)
    assert len({sha(i) for i in taken}) == 12 and images.count == 12
    for data in taken[:3]:
        img = Image.open(io.BytesIO(data))
        assert img.size == (384, 384) and img.mode == "RGB"
    assert distinct_image(3, base_images()) == taken[3]   # deterministic
    assert RequestImages(b"one", distinct=False).take(3) == [b"one"] * 3


def _hits(engine, work, n):
    seen = []
    add = engine.add_request
    engine.add_request = lambda rid, prompt, images, params: seen.append(sha(images[0])) or add(rid, prompt, images,
                                                                                                 params)
    images = RequestImages(work.image, work.distinct_images)
    for r in range(2):
        run_round(engine, work, n, 2, None, f"r{r}", images)
    return seen, engine.block_manager.prefix_hit_tokens_total


def test_distinct_images_share_only_the_text_in_the_prefix_cache(tiny_checkpoint):
    work = Workload(batch_sizes=[3], max_tokens=2, prefix_caching=True, distinct_images=True)
    seen, hits = _hits(make_engine(str(tiny_checkpoint), work, 8 << 20, "float32"), work, 3)
    same = Workload(batch_sizes=[3], max_tokens=2, prefix_caching=True)
    seen_same, hits_same = _hits(make_engine(str(tiny_checkpoint), same, 8 << 20, "float32"), same, 3)
    assert len(set(seen)) == 6 and len(set(seen_same)) == 1
    assert hits < hits_same / 2, (hits, hits_same)


def test_engine_bench_completes_with_distinct_images(tiny_checkpoint):
    work = Workload(batch_sizes=[2], max_tokens=3, warmup=0, prefix_caching=True, distinct_images=True)
    out = benchmark(str(tiny_checkpoint), work, 8 << 20, "float32", log=lambda m: None)
    assert out["rows"][0]["batch_size"] == 2 and out["distinct_images"] == 3 + 2 + 1   # TTFT x3, batch 2, batch 1
    assert work.describe()["image"].startswith("a different")
