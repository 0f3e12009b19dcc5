"""Tiny VLM-stage inputs for tests: an encoder export (micro ViT, 32 px, 16 patches) and LLaVA-format data."""
from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (245, 215, 30)}
SHAPES = ("square", "circle")


def make_encoder_export(out: Path, pre_norm: bool = True, image_size: int = 32, num_registers: int = 0) -> Path:
    from models.export import save_export
    from models.vit import ViTConfig, VisionTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vit = VisionTransformer(ViTConfig(size="micro", patch_size=8, image_size=image_size, pre_norm=pre_norm,
                                          num_registers=num_registers, init="scaled"))
    return save_export(out, vit, "vit", {"vision": asdict(vit.cfg), "image_mean": [0.48145466, 0.4578275, 0.40821073],
                                         "image_std": [0.26862954, 0.26130258, 0.27577711]})


def _image(colour: str, shape: str, rng: random.Random) -> Image.Image:
    from PIL import ImageDraw

    w, h = rng.choice([(40, 32), (32, 32), (32, 48)])
    im = Image.new("RGB", (w, h), (245, 245, 245))
    box = (6, 6, w - 6, h - 6)
    draw = ImageDraw.Draw(im)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
    return im


def make_llava_data(out: Path, records: int = 32, text_only: int = 4, seed: int = 0) -> dict[str, Path]:
    """stage1.json (captions) and stage2.json (multi-turn Q&A + text-only records), images under out/images."""
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    stage1, stage2 = [], []
    for i in range(records):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        name = f"{i:05d}.png"
        _image(colour, shape, rng).save(out / "images" / name)
        stage1.append({"id": f"cap{i}", "image": name, "conversations": [
            {"from": "human", "value": "Describe the image briefly.\n<image>"},
            {"from": "gpt", "value": f"a {colour} {shape}"}]})
        stage2.append({"id": f"qa{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": colour},
            {"from": "human", "value": "And its shape?"}, {"from": "gpt", "value": f"A {shape}."}]})
    for i in range(text_only):
        stage2.append({"id": f"text{i}", "conversations": [
            {"from": "human", "value": "What is two plus two?"}, {"from": "gpt", "value": "4"}]})
    paths = {"stage1": out / "stage1.json", "stage2": out / "stage2.json", "images": out / "images"}
    paths["stage1"].write_text(json.dumps(stage1))
    paths["stage2"].write_text(json.dumps(stage2))
    return paths
