#!/usr/bin/env python
"""A grid of synthetic-world samples at their native resolution (upscaled without smoothing), captions below:
look at what the encoders see, e.g. whether the rendered words are legible at the configured size.

    python benchmarks/synthetic_grid.py --config launch/configs/pretrain/tiny_clip.yaml \\
        --out benchmarks/results/synthetic_world_tiny.png
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.prepare import world_spec_from  # noqa: E402
from data.synthetic import make_sample  # noqa: E402
from train.config_loader import load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="launch/configs/pretrain/tiny_clip.yaml", help="a pretraining config")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--cols", type=int, default=8)
    p.add_argument("--zoom", type=int, default=3, help="nearest-neighbour upscaling (pixels stay visible)")
    args = p.parse_args(argv)
    d = load_config(args.config).data
    spec, size = world_spec_from(d), d.synthetic_image_size

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, axes = plt.subplots(args.rows, args.cols, figsize=(1.9 * args.cols, 2.3 * args.rows))
    for i, ax in enumerate(axes.flat):
        image, caption, factors = make_sample(0, "val", i, size, word_prob=d.synthetic_word_prob, spec=spec)
        ax.imshow(image.resize((size * args.zoom,) * 2, Image.NEAREST))
        ax.set_title("\n".join(textwrap.wrap(caption, 24)), fontsize=6.5)
        ax.set_axis_off()
    fig.suptitle(f"synthetic world at {size} px (val samples 0-{args.rows * args.cols - 1}; {args.config})", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
