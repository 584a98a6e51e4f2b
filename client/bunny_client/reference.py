"""`bunny-client reference`: the seed's GPU side (`run_coco_gpu.py`) without the server.

Captions the same folder with `bunny_backend.tools.reference.ReferenceBunny` (plain PyTorch, greedy), same prompt,
same JSON form as `coco`, so `clip-score` can compare the two files and tests can compare them word for word.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from .captions import DEFAULT_CAPTION_TOKENS, DEFAULT_PROMPT, CaptionWriter, list_images, load_captions, pending_images

_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


def resolve_device_dtype(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "float16"
    return torch.device(device), getattr(torch, _DTYPES[dtype])


def caption_folder_reference(model_path: str | Path, images_dir: str | Path, out: str | Path,
                             prompt: str = DEFAULT_PROMPT, max_tokens: int = DEFAULT_CAPTION_TOKENS,
                             device: str = "auto", dtype: str = "auto", resume: bool = False,
                             progress: bool = True) -> tuple[int, int]:
    """Caption the images with the reference model; returns (captioned, failed)."""
    from bunny_backend.io.tokenizer import load_tokenizer
    from bunny_backend.tools.reference import ReferenceBunny

    images = list_images(images_dir)
    done = load_captions(out) if resume else {}
    todo = pending_images(images, done)
    writer = CaptionWriter(out, initial={p.name: done[p.name] for p in images if done.get(p.name)})
    torch_device, torch_dtype = resolve_device_dtype(device, dtype)
    tokenizer = load_tokenizer(str(model_path))
    model = ReferenceBunny.from_pretrained(str(model_path), torch_dtype, torch_device)
    ok = failed = 0
    try:
        for path in tqdm(todo, desc="reference", unit="img", file=sys.stderr, disable=not progress):
            try:
                _, text = model.chat(tokenizer, prompt, path.read_bytes(), max_tokens)
            except Exception as err:  # one bad image must not stop the run
                failed += 1
                tqdm.write(f"bunny-client: {path.name}: {type(err).__name__}: {err}", file=sys.stderr)
                continue
            writer.add(path.name, text.strip())
            ok += 1
    finally:
        writer.close()
    return ok, failed


def add_parser(sub) -> None:
    p = sub.add_parser("reference", help="caption a folder with the PyTorch reference model (no server)")
    p.add_argument("--model-path", required=True, type=Path, help="Bunny checkpoint folder")
    p.add_argument("--images", required=True, type=Path, help="folder of images")
    p.add_argument("--out", type=Path, default=Path("gpu_coco_predict.json"), help="output JSON (default %(default)s)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="default %(default)r")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_CAPTION_TOKENS, help="default %(default)s")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when present)")
    p.add_argument("--dtype", default="auto", choices=["auto", *_DTYPES], help="default: float32 on cpu, else float16")
    p.add_argument("--resume", action="store_true", help="keep the captions already in --out, do the rest")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        ok, failed = caption_folder_reference(args.model_path, args.images, args.out, args.prompt, args.max_tokens,
                                              args.device, args.dtype, args.resume)
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"bunny-client: {err}", file=sys.stderr)
        return 1
    print(f"reference: {ok} captioned, {failed} failed -> {args.out}", file=sys.stderr)
    return 1 if failed and ok == 0 else 0
