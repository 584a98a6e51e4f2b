"""Client parts that need no tritonserver: request tensors, ranges, statistics, caption files, the CLIP judge."""
from __future__ import annotations

import base64
import json
import os

import numpy as np
import pytest
import torch
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor

from bunny_client.captions import CaptionWriter, list_images, load_captions, pending_images, write_json_atomic
from bunny_client.grpc_requests import RequestOptions, build_inputs, describe_error, parse_response
from bunny_client.perf_analyzer import input_data, serialize_bytes
from bunny_client.perf_stats import RequestTiming, parse_batch_sizes, summarize


def _tensors(opts, batched=False):
    return {t.name(): t for t in build_inputs(opts, batched)}


def test_build_inputs_sends_only_what_is_set():
    t = _tensors(RequestOptions(text="hi"))
    assert set(t) == {"text_input", "stream"}
    assert (t["text_input"].datatype(), t["text_input"].shape()) == ("BYTES", [1])
    assert (t["stream"].datatype(), t["stream"].shape()) == ("BOOL", [1])


def test_build_inputs_sends_a_conversation_as_messages():
    conversation = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "hi"},
                    {"role": "user", "content": "and?"}]
    t = _tensors(RequestOptions(messages=conversation, images=[b"a", b"b"]))
    assert set(t) == {"messages", "image", "stream"} and t["messages"].shape() == [1]
    assert json.loads(deserialize_bytes_tensor(t["messages"]._get_content())[0]) == conversation
    assert t["image"].shape() == [2]


def test_build_inputs_types_shapes_and_values():
    opts = RequestOptions(text="describe", images=[b"\x89PNG\x00a", b"jpg"], max_tokens=7, temperature=0.5, top_p=0.9,
                          top_k=3, repetition_penalty=1.1, seed=2**63 + 5, stop=["</s>", "\n\n"], ignore_eos=True,
                          stream=True, apply_chat_template=False)
    t = _tensors(opts)
    want = {"text_input": ("BYTES", [1]), "image": ("BYTES", [2]), "max_tokens": ("INT32", [1]),
            "temperature": ("FP32", [1]), "top_p": ("FP32", [1]), "top_k": ("INT32", [1]),
            "repetition_penalty": ("FP32", [1]), "seed": ("UINT64", [1]), "stop": ("BYTES", [2]),
            "ignore_eos": ("BOOL", [1]), "stream": ("BOOL", [1]), "apply_chat_template": ("BOOL", [1])}
    assert {k: (v.datatype(), v.shape()) for k, v in t.items()} == want
    raw = lambda name: t[name]._get_content()  # noqa: E731
    assert list(deserialize_bytes_tensor(raw("image"))) == [b"\x89PNG\x00a", b"jpg"]
    assert list(deserialize_bytes_tensor(raw("stop"))) == [b"</s>", b"\n\n"]
    assert np.frombuffer(raw("seed"), np.uint64)[0] == 2**63 + 5
    assert np.frombuffer(raw("max_tokens"), np.int32)[0] == 7
    assert np.frombuffer(raw("apply_chat_template"), np.bool_)[0] == np.False_


def test_the_chat_flags_reach_the_new_inputs():
    """--presence-penalty, --frequency-penalty, --min-tokens and --logprobs become the model's inputs."""
    import argparse

    from bunny_client.chat import add_sampling_args, sampling_from_args
    parser = argparse.ArgumentParser()
    add_sampling_args(parser)
    args = parser.parse_args(["--presence-penalty", "0.5", "--frequency-penalty", "-1", "--min-tokens", "4",
                              "--logprobs", "3"])
    t = _tensors(RequestOptions(text="hi", **sampling_from_args(args)))
    got = {name: (t[name].datatype(), np.frombuffer(t[name]._get_content(), dtype)[0]) for name, dtype in
           [("presence_penalty", np.float32), ("frequency_penalty", np.float32), ("min_tokens", np.int32),
            ("logprobs", np.int32)]}
    assert got == {"presence_penalty": ("FP32", 0.5), "frequency_penalty": ("FP32", -1.0),
                   "min_tokens": ("INT32", 4), "logprobs": ("INT32", 3)}
    assert set(t) == {"text_input", "stream", *got}


def test_build_inputs_batched_model_gets_leading_dim():
    t = _tensors(RequestOptions(text="x", images=[b"a"], max_tokens=3), batched=True)
    assert t["text_input"].shape() == [1, 1] and t["image"].shape() == [1, 1] and t["max_tokens"].shape() == [1, 1]


def _infer_result(outputs: list[tuple[str, str, bytes]], final: bool):
    from tritonclient.grpc import InferResult, service_pb2

    response = service_pb2.ModelInferResponse(model_name="bunny", id="r1")
    for name, dtype, raw in outputs:
        response.outputs.add(name=name, datatype=dtype, shape=[-1])
        response.raw_output_contents.append(raw)
    if final:
        response.parameters["triton_final_response"].bool_param = True
    return InferResult(response)


def test_parse_response_reads_raw_contents():
    """Each streamed token's response is read straight from its raw contents: text (multi-byte UTF-8), ids, the
    counters, the final flag; an empty final response is an empty Delta."""
    ints = lambda *v: np.array(v, dtype=np.int32).tobytes()  # noqa: E731
    piece = "\u732b\u306f".encode()
    delta = parse_response(_infer_result([
        ("text_output", "BYTES", serialize_bytes(piece)), ("output_ids", "INT32", ints(151643, 7)),
        ("finish_reason", "BYTES", serialize_bytes(b"")), ("prompt_tokens", "INT32", ints(12)),
        ("completion_tokens", "INT32", ints(2))], final=False), t=1.5)
    assert (delta.text, delta.ids, delta.t, delta.final) == ("\u732b\u306f", [151643, 7], 1.5, False)
    assert (delta.finish_reason, delta.prompt_tokens, delta.completion_tokens) == ("", 12, 2)
    last = parse_response(_infer_result([
        ("text_output", "BYTES", serialize_bytes(b"")), ("output_ids", "INT32", b""),
        ("finish_reason", "BYTES", serialize_bytes(b"length")), ("prompt_tokens", "INT32", ints(12)),
        ("completion_tokens", "INT32", ints(3))], final=True), t=2.0)
    assert (last.text, last.ids, last.final, last.finish_reason, last.completion_tokens) == ("", [], True, "length", 3)
    empty = parse_response(_infer_result([], final=True), t=3.0)
    assert (empty.text, empty.ids, empty.final, empty.prompt_tokens, empty.finish_reason) == ("", [], True, None, "")


@pytest.mark.parametrize("message, shown", [
    ("in stream: [invalid_argument] max_tokens must be >= 1, got 0", "max_tokens must be >= 1, got 0"),
    ("[unavailable] server busy: failed to connect is not what happened", "server busy: failed to connect is not "
                                                                          "what happened"),
    ("failed to connect to all addresses", "cannot reach the Triton server at h:1 (is it running?)"),
    ("Request for unknown model: 'bunny' is not found", "Request for unknown model: 'bunny' is not found"),
])
def test_describe_error_shows_the_models_message_without_its_code(message, shown):
    assert describe_error(InferenceServerException(message), "h:1") == shown


def test_parse_batch_sizes():
    assert parse_batch_sizes("1-10") == list(range(1, 11))
    assert parse_batch_sizes("1,2,4,8") == [1, 2, 4, 8]
    assert parse_batch_sizes("8, 1-3,2") == [1, 2, 3, 8]
    for bad in ("", "0-3", "5-2", "a-b", "3-"):
        with pytest.raises(ValueError):
            parse_batch_sizes(bad)


def test_summarize_throughput_and_latency():
    # round 1: two requests of 5 tokens over 2 s; round 2: one of 3 tokens (other failed) over 1 s
    r1 = [RequestTiming(sent=0.0, first=0.1, last=0.5, tokens=5), RequestTiming(sent=0.0, first=0.3, last=1.1, tokens=5)]
    r2 = [RequestTiming(sent=10.0, first=10.2, last=10.4, tokens=3)]
    s = summarize(2, [(2.0, r1), (1.0, r2)], failed=1)
    assert (s.requests, s.failed, s.rounds) == (3, 1, 2)
    assert s.requests_per_s == pytest.approx(1.0)
    assert s.output_tokens_per_s == pytest.approx(13 / 3)
    assert s.ttft_mean_ms == pytest.approx(200.0)
    assert s.ttft_p90_ms == pytest.approx(np.percentile([100, 300, 200], 90))
    assert s.itl_mean_ms == pytest.approx(1000 * np.mean([0.1, 0.2, 0.1]))
    one_token = summarize(1, [(1.0, [RequestTiming(0.0, 0.5, 0.5, 1)])])
    assert np.isnan(one_token.itl_mean_ms) and one_token.ttft_mean_ms == pytest.approx(500)


def test_atomic_write_resume_and_writer(tmp_path):
    out = tmp_path / "sub" / "pred.json"
    assert load_captions(out) == {}
    write_json_atomic(out, {"a.jpg": "a cat", "b.png": "ünïcode"})
    assert load_captions(out) == {"a.jpg": "a cat", "b.png": "ünïcode"}
    assert [p.name for p in out.parent.iterdir()] == ["pred.json"]  # no temp file left
    for name in ("b.png", "a.jpg", "c.JPEG", "notes.txt", "d.gif"):
        (tmp_path / name).write_bytes(b"x")
    images = list_images(tmp_path)
    assert [p.name for p in images] == ["a.jpg", "b.png", "c.JPEG"]
    assert [p.name for p in pending_images(images, {"a.jpg": "cap", "b.png": ""})] == ["b.png", "c.JPEG"]
    w = CaptionWriter(out, initial={"a.jpg": "old"}, every_s=3600)
    w.add("c.JPEG", "new")
    assert "c.JPEG" not in load_captions(out)  # not yet due
    w.close()
    assert load_captions(out) == {"a.jpg": "old", "c.JPEG": "new"}
    out.write_text("[1, 2]")
    with pytest.raises(ValueError):
        load_captions(out)


def test_perf_analyzer_input_carries_serialized_image():
    data = input_data("describe", b"\x00\x01image", 8)["data"][0]
    raw = base64.b64decode(data["image"]["content"]["b64"])
    assert raw == serialize_bytes(b"\x00\x01image")
    assert list(deserialize_bytes_tensor(raw)) == [b"\x00\x01image"]
    assert data["max_tokens"]["content"] == [8] and data["stream"]["content"] == [True]
    assert data["ignore_eos"]["content"] == [True] and data["text_input"]["content"] == ["describe"]


# ---- the CLIP judge, on a tiny random open_clip model registered at run time ----

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import torch

    from bunny_client.openclip_import import import_open_clip

    try:
        open_clip = import_open_clip()
    except ImportError as err:
        pytest.skip(str(err))
    folder = tmp_path_factory.mktemp("clip")
    (folder / "bunny-test-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    model = open_clip.create_model("bunny-test-tiny-clip")
    weights = folder / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), weights)
    return "bunny-test-tiny-clip", weights


@pytest.fixture(scope="module")
def skimage_dir(tmp_path_factory):
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("images")
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.jpg")
    return folder


def test_clip_scores_in_range_and_side_by_side(tiny_clip, skimage_dir, tmp_path, capsys):
    from bunny_client.cli import main
    from bunny_client.clip_score import ClipJudge, clip_scores, mean_clip_score, score_files

    name, weights = tiny_clip
    a = tmp_path / "gpu_coco_predict.json"
    b = tmp_path / "predict_result.json"
    write_json_atomic(a, {"astronaut.jpg": "a woman in a space suit", "coffee.jpg": "a cup of coffee",
                          "chelsea.jpg": "a cat"})
    write_json_atomic(b, {"astronaut.jpg": "an astronaut", "coffee.jpg": "coffee", "missing.jpg": "nothing"})
    judge = ClipJudge.load(name, weights, "cpu")
    result = score_files(judge, skimage_dir, [a, b])
    assert set(result[str(a)]) == {"astronaut.jpg", "coffee.jpg", "chelsea.jpg"}
    assert set(result[str(b)]) == {"astronaut.jpg", "coffee.jpg"}
    assert all(-1.0 <= c <= 1.0 for r in result.values() for c in r.values())   # raw cosines
    feats = judge.image_features(sorted(skimage_dir.iterdir()))
    assert clip_scores(feats, feats) == pytest.approx([100.0] * 3, abs=1e-3)  # identical embeddings score 100
    assert clip_scores(feats, -feats) == [0.0] * 3  # opposite ones are floored at 0

    # The oracle: each image and caption through the open_clip model alone, the cosine in plain torch.
    def oracle(captions: dict[str, str]) -> tuple[float, float]:
        from PIL import Image
        cos = []
        for image_name, caption in captions.items():
            if not (skimage_dir / image_name).is_file():
                continue
            with Image.open(skimage_dir / image_name) as im, torch.no_grad():
                img = judge.model.encode_image(judge.preprocess(im.convert("RGB")).unsqueeze(0)).float()[0]
                txt = judge.model.encode_text(judge.tokenizer([caption])).float()[0]
            cos.append(torch.dot(img, txt).item() / (img.norm().item() * txt.norm().item()))
        return sum(max(0.0, 100.0 * c) for c in cos) / len(cos), sum(cos) / len(cos)

    want = {str(f): oracle(json.loads(f.read_text())) for f in (a, b)}
    for f in (a, b):
        assert mean_clip_score(result[str(f)]) == pytest.approx(want[str(f)][0], abs=1e-3)

    rc = main(["clip-score", "--captions", str(a), "--captions", str(b), "--images", str(skimage_dir),
               "--model", name, "--weights", str(weights), "--device", "cpu", "--out", str(tmp_path / "s.json")])
    out = capsys.readouterr().out
    assert rc == 0
    for f in (str(a), str(b)):   # both figures: 100 x cosine floored at 0, and MindIE's mean raw cosine
        line = next(line for line in out.splitlines() if line.startswith("clip score ") and line.endswith(f))
        assert float(line.split()[2]) == pytest.approx(want[f][0], abs=0.006), (line, want[f])
        assert float(line.split("mean cosine ")[1].split()[0]) == pytest.approx(want[f][1], abs=6e-5), (line, want[f])
    diff = want[str(b)][0] - want[str(a)][0]
    printed_diff = float(next(line for line in out.splitlines() if line.startswith("difference")).split()[-1])
    assert printed_diff == pytest.approx(diff, abs=0.011)
    saved = json.loads((tmp_path / "s.json").read_text())[str(a)]
    assert saved["mean"] == pytest.approx(want[str(a)][0], abs=1e-3)
    assert saved["mean_cosine"] == pytest.approx(want[str(a)][1], abs=1e-5)


def test_clip_score_missing_weights_is_one_line(skimage_dir, tmp_path, capsys):
    from bunny_client.cli import main

    (tmp_path / "c.json").write_text('{"coffee.jpg": "coffee"}')
    rc = main(["clip-score", "--captions", str(tmp_path / "c.json"), "--images", str(skimage_dir),
               "--weights", os.fspath(tmp_path / "nope.bin")])
    err = capsys.readouterr().err
    assert rc == 1 and "nope.bin" in err and len(err.strip().splitlines()) == 1


def test_a_response_of_several_tokens_counts_each_token_in_the_inter_token_latency():
    """A server that merges a stream's tokens sends some responses with several: the latency per token after the
    first response's tokens is the time between the first and last response over the tokens that came after."""
    t = RequestTiming(sent=0.0)
    for at, n in [(1.0, 2), (1.2, 0), (1.3, 3), (1.5, 1)]:   # an empty response carries no token and is not counted
        t.record(at, n)
    assert (t.first, t.first_tokens, t.last, t.tokens, t.responses) == (1.0, 2, 1.5, 6, 3)
    assert t.ttft == 1.0 and t.itl == pytest.approx(0.5 / 4)
    one = RequestTiming(sent=0.0)
    one.record(2.0, 5)   # everything in one response: no gap to measure
    assert one.itl is None and one.ttft == 2.0


def test_chat_without_streaming_reports_latency_not_a_first_token():
    from bunny_client.chat import ChatResult, latency_label
    whole = ChatResult("a", [1], "stop", 3, 1, ttft_s=None, elapsed_s=0.25)
    streamed = ChatResult("a", [1], "stop", 3, 1, ttft_s=0.05, elapsed_s=0.25)
    assert (latency_label(whole), latency_label(streamed)) == ("latency 250 ms", "first token 50 ms")
