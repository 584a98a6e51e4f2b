"""The client jobs end to end against an in-process fake of Triton's gRPC service (no tritonserver needed).

The same scenarios run against the real server in test_client_server.py; here they pin the client's own
behaviour: streaming, errors as one line, coco resume/failures, perf files, the perf_analyzer invocation.
"""
from __future__ import annotations

import json

import pytest
from fake_triton_server import FakeServer
from PIL import Image

from bunny_backend.server.launch import free_ports
from bunny_client.chat import chat
from bunny_client.cli import main
from bunny_client.grpc_requests import BunnyClientError
from bunny_client.perf import synthetic_image


@pytest.fixture(scope="module")
def fake():
    server = FakeServer(token_delay_s=0.001)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from skimage import data

    folder = tmp_path_factory.mktemp("coco")
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.jpg")
    Image.fromarray(data.camera()).save(folder / "camera.png")
    return folder


def test_chat_stream_and_whole(fake):
    streamed = chat(fake.url, "what is it", synthetic_image(), stream=True, max_tokens=4)
    whole = chat(fake.url, "what is it", synthetic_image(), stream=False, max_tokens=4)
    assert streamed.text == whole.text and streamed.text.startswith("caption")
    assert streamed.ids == whole.ids == [1, 2, 3, 4]
    assert streamed.finish_reason == whole.finish_reason == "length"
    assert streamed.completion_tokens == 4 and streamed.prompt_tokens > 0 and 0 < streamed.ttft_s <= streamed.elapsed_s


def test_chat_cli_prints_answer_and_speed(fake, images, capsys):
    rc = main(["chat", "--url", fake.url, "--image", str(images / "coffee.jpg"), "--stream", "--max-tokens", "3", "hi"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.startswith("caption") and "tokens/s" in err


def test_chat_against_stopped_server_is_one_line(capsys):
    rc = main(["chat", "--url", f"127.0.0.1:{free_ports(1)[0]}", "hello"])
    out, err = capsys.readouterr()
    assert rc != 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and "cannot reach" in err and "Traceback" not in err


def test_server_error_is_one_line(fake, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(BunnyClientError, match="not a readable image"):
        chat(fake.url, "x", bad.read_bytes())
    rc = main(["chat", "--url", fake.url, "--image", str(bad), "hello"])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "not a readable image" in err


def test_coco_resume_and_failures(fake, images, tmp_path, capsys):
    out = tmp_path / "predict_result.json"
    args = ["coco", "--url", fake.url, "--images", str(images), "--out", str(out), "--concurrency", "3"]
    assert main(args) == 0
    captions = json.loads(out.read_text())
    assert sorted(captions) == sorted(p.name for p in images.iterdir()) and all(captions.values())
    before = fake.servicer.requests
    assert main(args + ["--resume"]) == 0
    assert fake.servicer.requests == before  # nothing left to send

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for p in images.iterdir():
        (mixed / p.name).write_bytes(p.read_bytes())
    (mixed / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    capsys.readouterr()
    out2 = tmp_path / "p2.json"
    assert main(["coco", "--url", fake.url, "--images", str(mixed), "--out", str(out2)]) == 0
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "1 failed" in err
    assert sorted(json.loads(out2.read_text())) == sorted(captions)
    assert main(["coco", "--url", fake.url, "--images", str(mixed), "--out", str(out2), "--strict"]) == 1


def test_coco_server_down_is_one_line(images, tmp_path, capsys):
    rc = main(["coco", "--url", f"127.0.0.1:{free_ports(1)[0]}", "--images", str(images), "--out", str(tmp_path / "o.json")])
    assert rc == 1 and "cannot reach" in capsys.readouterr().err


def test_perf_writes_table_csv_json_png(fake, tmp_path, capsys):
    rc = main(["perf", "--url", fake.url, "--batch-sizes", "1-3", "--max-tokens", "8", "--rounds", "2",
               "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and out.splitlines()[0].split()[:3] == ["batch", "req/s", "out"]
    rows = json.loads((tmp_path / "perf.json").read_text())["results"]
    assert [r["batch_size"] for r in rows] == [1, 2, 3]
    assert all(r["tokens_per_request"] == 8 and r["failed"] == 0 and r["output_tokens_per_s"] > 0 for r in rows)
    assert len((tmp_path / "perf.csv").read_text().strip().splitlines()) == 4
    with Image.open(tmp_path / "perf.png") as png:
        assert png.size[0] > 400


def test_perf_analyzer_sweep(fake, tmp_path):
    from bunny_client.perf_analyzer import PerfAnalyzerMissing, check_libraries, environment, find_binary

    try:
        check_libraries(find_binary(), environment())
    except PerfAnalyzerMissing as err:
        pytest.skip(str(err))
    rc = main(["perf", "--url", fake.url, "--batch-sizes", "1-2", "--max-tokens", "4", "--rounds", "1",
               "--out", str(tmp_path), "--perf-analyzer", "--pa-request-count", "2"])
    assert rc == 0
    report = (tmp_path / "perf_analyzer.txt").read_text()
    assert "Request concurrency: 1" in report and "Request concurrency: 2" in report
    assert (tmp_path / "perf_analyzer.csv").stat().st_size > 0
