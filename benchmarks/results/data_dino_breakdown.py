#!/usr/bin/env python
"""Where the time of DINO multi-crop goes, per image on ONE CPU thread: PIL/torchvision vs DALI CPU-only.

    python benchmarks/results/data_dino_breakdown.py [--shards 'data_cache/bench_data/world_512x320/train-*.tar']

torchvision: each op timed alone on real crops (probabilities applied as in DinoMultiCrop), plus the
whole transform. DALI: the training pipeline with stages switched off one at a time; a stage costs
the difference. CPU seconds per image (process time; DALI runs with num_threads=1).
"""
from __future__ import annotations

import argparse
import io
import os
import random
import sys
import tarfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from data.shards import expand_shards  # noqa: E402
from data.transforms import (DinoMultiCrop, color_jitter, gaussian_blur, random_resized_crop,  # noqa: E402
                             to_normalized_float)

SIZES = [224] * 2 + [96] * 10
SCALES = [(0.4, 1.0)] * 2 + [(0.05, 0.4)] * 10


def cpu_ms(fn, items) -> float:
    t = time.process_time()
    for i, item in enumerate(items):
        fn(item, random.Random(i))
    return (time.process_time() - t) / len(items) * 1000


def torchvision_stages(jpegs: list[bytes]) -> dict[str, float]:
    import torchvision.transforms.v2.functional as TF

    torch.set_num_threads(1)
    def decode(data: bytes) -> torch.Tensor:
        return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1).contiguous()

    images = [decode(b) for b in jpegs]
    crops = [[random_resized_crop(img, random.Random(i), s, sc) for s, sc in zip(SIZES, SCALES)]
             for i, img in enumerate(images)]
    out = {"decode": cpu_ms(lambda b, r: decode(b), jpegs),
           "12 random resized crops": cpu_ms(lambda img, r: [random_resized_crop(img, r, s, sc)
                                                             for s, sc in zip(SIZES, SCALES)], images),
           "colour jitter (x0.8)": 0.8 * cpu_ms(lambda cs, r: [color_jitter(c, r) for c in cs], crops),
           "grayscale (x0.2)": 0.2 * cpu_ms(lambda cs, r: [TF.rgb_to_grayscale(c, 3) for c in cs], crops),
           "blur (x p per crop)": cpu_ms(lambda cs, r: [gaussian_blur(c, r) for c, p in zip(cs, [1.0, 0.1] + [0.5] * 10)
                                                        if r.random() < p], crops),
           "flip + normalise": cpu_ms(lambda cs, r: [to_normalized_float(TF.horizontal_flip(c), (0.5,) * 3, (0.2,) * 3)
                                                     for c in cs], crops)}
    out["whole DinoMultiCrop (decode incl.)"] = cpu_ms(lambda b, r: DinoMultiCrop(224, 96, 2, 10)(decode(b), r), jpegs)
    return out


def dali_stages(shards: list[str], batches: int = 8, batch: int = 32) -> dict[str, float]:
    import data.dali.pipelines as P
    from data.dali.index import ensure_indexes

    indexes = ensure_indexes(shards)
    original = (P._colour_jitter, P._blur)

    def run(jitter: bool, blur: bool) -> float:
        P._colour_jitter = original[0] if jitter else (lambda c: c)
        P._blur = original[1] if blur else (lambda c, w: c)
        spec = P.TrainSpec(dino=DinoMultiCrop(224, 96, 2, 10))
        pipe = P.build_train_pipeline(spec, shards, indexes, batch, 1, 5, 6, 0, 1, 256)
        pipe.build()
        for _ in range(2):
            pipe.run()
        t = time.process_time()
        for _ in range(batches):
            [np.array(x.as_tensor()) for x in pipe.run()[1:]]
        return (time.process_time() - t) / (batches * batch) * 1000

    full, no_jitter, no_blur, neither = run(True, True), run(False, True), run(True, False), run(False, False)
    P._colour_jitter, P._blur = original
    return {"decode + 12 crops + flip/normalise + output copy": neither, "colour jitter + grayscale": full - no_jitter,
            "blur": full - no_blur, "whole pipeline": full}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", default="data_cache/bench_data/world_512x320/train-*.tar")
    parser.add_argument("--images", type=int, default=96)
    args = parser.parse_args()
    shards = expand_shards(args.shards)
    jpegs = []
    with tarfile.open(shards[0]) as tar:
        jpegs = [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")][: args.images]
    print(f"load average {os.getloadavg()[0]:.2f}; {len(jpegs)} images from {shards[0]}; CPU ms per image, 1 thread")
    for name, stages in (("PIL/torchvision", torchvision_stages(jpegs)), ("DALI CPU-only", dali_stages(shards))):
        print(f"{name}:")
        for stage, ms in stages.items():
            print(f"  {stage:50s} {ms:7.2f}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
