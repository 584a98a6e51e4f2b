"""The client jobs against the real tritonserver serving the tiny test checkpoint (marker `server`).

`bunny_server` (tests/server_fixture.py) runs `bunny-serve` once per session on free ports.
"""
from __future__ import annotations

import json

import pytest
from PIL import Image

from bunny_client import coco as coco_module
from bunny_client.cli import main

pytestmark = pytest.mark.server
CAPTION_TOKENS = "12"


@pytest.fixture(scope="module")
def server(bunny_server):
    return bunny_server.url, bunny_server.model_path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from skimage import data

    folder = tmp_path_factory.mktemp("coco")
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.jpg")
    Image.fromarray(data.camera()).save(folder / "camera.png")
    return folder


def _coco(url, images, out, *extra):
    return main(["coco", "--url", url, "--images", str(images), "--out", str(out), "--max-tokens", CAPTION_TOKENS,
                 *extra])


def test_chat_answers_with_speed(server, images, capsys):
    url, _ = server
    rc = main(["chat", "--url", url, "--image", str(images / "coffee.jpg"), "--stream", "--max-tokens", "6",
               "--ignore-eos", "What is in the image?"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.strip() and "completion 6 tokens" in err and "tokens/s" in err


def test_coco_captions_every_image_and_resume_sends_nothing(server, images, tmp_path, monkeypatch):
    url, _ = server
    out = tmp_path / "predict_result.json"
    assert _coco(url, images, out, "--concurrency", "2") == 0
    captions = json.loads(out.read_text())
    assert sorted(captions) == sorted(p.name for p in images.iterdir())
    assert all(c.strip() for c in captions.values())

    sent = []
    real = coco_module.run_request
    monkeypatch.setattr(coco_module, "run_request", lambda *a, **k: sent.append(1) or real(*a, **k))
    assert _coco(url, images, out, "--resume") == 0
    assert sent == [] and json.loads(out.read_text()) == captions


def test_coco_reports_an_unreadable_image_and_goes_on(server, images, tmp_path, capsys):
    url, _ = server
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for p in images.iterdir():
        (mixed / p.name).write_bytes(p.read_bytes())
    (mixed / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    out = tmp_path / "p.json"
    assert _coco(url, mixed, out) == 0
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "1 failed" in err
    assert sorted(json.loads(out.read_text())) == sorted(p.name for p in images.iterdir())


def test_reference_matches_coco_greedy(server, images, tmp_path):
    url, model_path = server
    served, ref = tmp_path / "predict_result.json", tmp_path / "gpu_coco_predict.json"
    assert _coco(url, images, served, "--concurrency", "1") == 0
    assert main(["reference", "--model-path", str(model_path), "--images", str(images), "--out", str(ref),
                 "--max-tokens", CAPTION_TOKENS, "--device", "cpu", "--dtype", "float32"]) == 0
    assert json.loads(ref.read_text()) == json.loads(served.read_text())


def test_perf_writes_reports(server, tmp_path, capsys):
    url, _ = server
    rc = main(["perf", "--url", url, "--batch-sizes", "1-3", "--max-tokens", "8", "--rounds", "1", "--out", str(tmp_path)])
    assert rc == 0
    assert capsys.readouterr().out.splitlines()[0].split()[0] == "batch"
    rows = json.loads((tmp_path / "perf.json").read_text())["results"]
    assert [r["batch_size"] for r in rows] == [1, 2, 3]
    assert all(r["failed"] == 0 and r["tokens_per_request"] == 8 for r in rows)
    assert len((tmp_path / "perf.csv").read_text().strip().splitlines()) == 4
    with Image.open(tmp_path / "perf.png") as png:
        png.verify()


def test_perf_analyzer_sweep(server, tmp_path):
    from bunny_client.perf_analyzer import PerfAnalyzerMissing, check_libraries, environment, find_binary

    try:
        check_libraries(find_binary(), environment())
    except PerfAnalyzerMissing as err:
        pytest.skip(str(err))
    url, _ = server
    rc = main(["perf", "--url", url, "--batch-sizes", "1-2", "--max-tokens", "4", "--rounds", "1",
               "--out", str(tmp_path), "--perf-analyzer", "--pa-request-count", "2"])
    report = (tmp_path / "perf_analyzer.txt").read_text()
    assert rc == 0, report[-2000:]
    assert "Request concurrency: 1" in report and "Request concurrency: 2" in report


def test_chat_bad_image_is_one_line(server, tmp_path, capsys):
    url, _ = server
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    rc = main(["chat", "--url", url, "--image", str(bad), "hello"])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
