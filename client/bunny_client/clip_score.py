"""`bunny-client clip-score`: the seed's open_clip judge (`clip_score_bunny.py`).

Two figures per caption file, both over its captioned images:
- clip score: the mean of max(0, 100 * cosine(image embedding, caption embedding)), the usual CLIPScore scale;
- mean cosine: the mean of the raw cosine similarities, the number MindIE's clip_score_bunny.py prints, so that
  results can be set beside theirs.
Several caption files (e.g. gpu_coco_predict.json and predict_result.json) print side by side with the difference
of their clip scores (each file against the first). Weights come from a local file only.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from .captions import list_images, load_captions
from .openclip_import import import_open_clip


@dataclass
class ClipJudge:
    model: object
    preprocess: object
    tokenizer: object
    device: object

    @classmethod
    def load(cls, model_name: str, weights: str | Path, device: str = "auto") -> "ClipJudge":
        import torch

        open_clip = import_open_clip()
        if not Path(weights).is_file():
            raise FileNotFoundError(f"open_clip weights not found: {weights}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(weights), device=device)
        model.eval()
        return cls(model, preprocess, open_clip.get_tokenizer(model_name), torch.device(device))

    def image_features(self, paths: list[Path], batch: int = 16):
        """L2-normalised image embeddings, one row per path."""
        import torch
        from PIL import Image

        rows = []
        for i in range(0, len(paths), batch):
            pixels = []
            for p in paths[i:i + batch]:
                with Image.open(p) as im:
                    pixels.append(self.preprocess(im.convert("RGB")))
            with torch.no_grad():
                rows.append(self.model.encode_image(torch.stack(pixels).to(self.device)).float())
        return torch.nn.functional.normalize(torch.cat(rows), dim=-1)

    def text_features(self, texts: list[str], batch: int = 64):
        import torch

        rows = []
        for i in range(0, len(texts), batch):
            with torch.no_grad():
                rows.append(self.model.encode_text(self.tokenizer(texts[i:i + batch]).to(self.device)).float())
        return torch.nn.functional.normalize(torch.cat(rows), dim=-1)


def cosines(image_feats, text_feats) -> list[float]:
    """Row-wise cosine similarity of two L2-normalised embedding matrices."""
    return [float(c) for c in (image_feats * text_feats).sum(dim=-1)]


def clip_score(cosine: float) -> float:
    return max(0.0, 100.0 * cosine)


def clip_scores(image_feats, text_feats) -> list[float]:
    """Row-wise max(0, 100 * cosine) of two L2-normalised embedding matrices."""
    return [clip_score(c) for c in cosines(image_feats, text_feats)]


def score_files(judge: ClipJudge, images_dir: str | Path, caption_files: list[str | Path]) -> dict[str, dict[str, float]]:
    """{caption file: {image name: cosine}} over the images of the folder that the file captions."""
    images = list_images(images_dir)
    captions = {str(f): load_captions(f) for f in caption_files}
    for f, caps in captions.items():
        if not caps:
            raise ValueError(f"no captions in {f}")
    wanted = [p for p in images if any(p.name in caps for caps in captions.values())]
    if not wanted:
        raise ValueError(f"none of the captioned files is in {images_dir}")
    feats = judge.image_features(wanted)
    row = {p.name: i for i, p in enumerate(wanted)}
    result = {}
    for f, caps in captions.items():
        names = [p.name for p in wanted if p.name in caps]
        text = judge.text_features([caps[n] for n in names])
        result[f] = dict(zip(names, cosines(feats[[row[n] for n in names]], text)))
    return result


def mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values) if values else 0.0


def mean_clip_score(cos: dict[str, float]) -> float:
    return mean({n: clip_score(c) for n, c in cos.items()})


def format_report(result: dict[str, dict[str, float]], per_image: bool = True) -> str:
    """Per-image clip scores side by side, then each file's two figures and its difference from the first file."""
    files = list(result)
    width = max([12] + [len(n) for s in result.values() for n in s])
    head = "".join(f"{Path(f).name[:22]:>24}" for f in files)
    lines = [f"{'image':<{width}}{head}"] if per_image else []
    if per_image:
        for name in sorted({n for s in result.values() for n in s}):
            cells = "".join(f"{clip_score(result[f][name]):24.2f}" if name in result[f] else f"{'-':>24}"
                            for f in files)
            lines.append(f"{name:<{width}}{cells}")
    lines.append(f"{'clip score':<{width}}" + "".join(f"{mean_clip_score(result[f]):24.2f}" for f in files))
    lines.append(f"{'mean cosine':<{width}}" + "".join(f"{mean(result[f]):24.4f}" for f in files))
    lines.append(f"{'images':<{width}}" + "".join(f"{len(result[f]):24d}" for f in files))
    if len(files) > 1:
        base = mean_clip_score(result[files[0]])
        lines.append(f"{'difference':<{width}}" + "".join(f"{mean_clip_score(result[f]) - base:+24.2f}"
                                                          for f in files))
    for f in files:
        lines.append(f"clip score {mean_clip_score(result[f]):.2f} (mean of max(0, 100 x cosine)); "
                     f"mean cosine {mean(result[f]):.4f} (MindIE clip_score_bunny.py)  ({len(result[f])} images)  {f}")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("clip-score", help="score caption files against their images with open_clip")
    p.add_argument("--captions", action="append", required=True, type=Path, metavar="FILE.json",
                   help="caption file {image name: caption}; repeat to compare several")
    p.add_argument("--images", required=True, type=Path, help="folder of the images")
    p.add_argument("--model", default="ViT-H-14", help="open_clip model name (default %(default)s)")
    p.add_argument("--weights", type=Path, default=Path("open_clip_pytorch_model.bin"),
                   help="local open_clip weights file (default %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when present)")
    p.add_argument("--out", type=Path, help="also write the per-image scores and means as JSON")
    p.add_argument("--summary", action="store_true", help="print only the means")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        judge = ClipJudge.load(args.model, args.weights, args.device)
        result = score_files(judge, args.images, args.captions)
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as err:
        print(f"bunny-client: {err}", file=sys.stderr)
        return 1
    print(format_report(result, per_image=not args.summary))
    if args.out:
        args.out.write_text(json.dumps({f: {"mean": mean_clip_score(c), "mean_cosine": mean(c),
                                            "scores": {n: clip_score(x) for n, x in c.items()}, "cosines": c}
                                        for f, c in result.items()}, indent=1))
    return 0
