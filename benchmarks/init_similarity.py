#!/usr/bin/env python
"""How alike are the CLS features of different images at initialisation? (mean off-diagonal cosine)

A contrastive loss starts at ln(batch) and learns slowly while every image maps to nearly the same feature.
Compares our ViT's two inits (model.vision.init) and open_clip's ViT of the same size, on synthetic images.

    python benchmarks/init_similarity.py --data data_cache/synthetic | tee benchmarks/results/init_similarity_cpu.txt
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eval.data import EvalDataError, decode_sample, iter_samples, open_eval_data  # noqa: E402
from models.vit import ViTConfig, VisionTransformer  # noqa: E402


def mean_offdiag_cos(features: torch.Tensor) -> float:
    f = F.normalize(features.float(), dim=-1)  # (N, D)
    sim = f @ f.T  # (N, N)
    n = len(f)
    return ((sim.sum() - sim.diagonal().sum()) / (n * n - n)).item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data_cache/synthetic", help="the synthetic world's folder")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--seeds", type=int, default=3, help="initialisations averaged per model")
    args = p.parse_args(argv)
    try:
        data = open_eval_data(args.data)
    except EvalDataError as e:
        raise SystemExit(f"error: {e}")
    images = []
    for _, _, raw in iter_samples(data.shards("train")):
        images.append(decode_sample(raw, data)["image"])
        if len(images) == args.images:
            break
    x = torch.stack(images).float() / 255  # (N, 3, S, S)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    x = (x - mean) / std
    size = x.shape[-1]
    print(f"# python benchmarks/init_similarity.py --data {args.data} --images {args.images} --seeds {args.seeds}")
    print(f"{len(x)} images at {size} px; micro ViT/8 (width 128, depth 4) as in the tiny configs, pre_norm")
    models = {
        "ours, init=trunc_normal (default: timm / DINO)": lambda: VisionTransformer(ViTConfig(
            size="micro", patch_size=8, image_size=size, pre_norm=True, init="trunc_normal")),
        "ours, init=scaled (OpenAI CLIP)": lambda: VisionTransformer(ViTConfig(
            size="micro", patch_size=8, image_size=size, pre_norm=True, init="scaled")),
    }
    try:
        from open_clip.transformer import VisionTransformer as OpenClipViT

        models["open_clip VisionTransformer (PyTorch default inits)"] = lambda: OpenClipViT(
            image_size=size, patch_size=8, width=128, layers=4, heads=4, mlp_ratio=4.0, output_dim=128)
    except ImportError:
        print("open_clip is not installed: its row is skipped")
    for name, build in models.items():
        values = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            with torch.no_grad():
                values.append(mean_offdiag_cos(build().eval()(x)))
        print(f"{name:55s} mean cosine {sum(values) / len(values):.3f}  (seeds: {', '.join(f'{v:.3f}' for v in values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
