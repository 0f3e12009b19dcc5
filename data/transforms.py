"""Image transforms for CLIP, DINO multi-crop and evaluation, each written once.

Every random choice comes from an explicit `random.Random` passed in by the caller, so a sample's
augmentation is a pure function of its seed: the loader seeds it from (seed, rank, worker, pass,
index), which is what makes resuming mid-epoch reproduce the same crops bit for bit.
Images flow as uint8 tensors (3, H, W) until the final float conversion and normalisation.
Parameter distributions follow torchvision / facebookresearch/dino (see docs/data.md).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

BICUBIC = InterpolationMode.BICUBIC


def random_resized_crop_params(rng: random.Random, height: int, width: int, scale: Sequence[float],
                               ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop sampling: (top, left, h, w) of the crop box."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # fallback: central crop at the clamped aspect ratio
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(img: torch.Tensor, rng: random.Random, size: int, scale: Sequence[float]) -> torch.Tensor:
    top, left, h, w = random_resized_crop_params(rng, img.shape[-2], img.shape[-1], scale)
    return TF.resized_crop(img, top, left, h, w, [size, size], interpolation=BICUBIC, antialias=True)


def to_normalized_float(img: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = img.float().div_(255.0)  # (3, H, W) in [0, 1]
    return TF.normalize(x, list(mean), list(std))


@dataclass
class ClipTransform:
    """open_clip's train transform: random resized crop (scale 0.9-1), bicubic, normalise."""
    size: int = 224
    scale: Sequence[float] = (0.9, 1.0)
    mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073)
    std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711)

    def __call__(self, img: torch.Tensor, rng: random.Random) -> torch.Tensor:
        return to_normalized_float(random_resized_crop(img, rng, self.size, self.scale), self.mean, self.std)


@dataclass
class EvalTransform:
    """Resize the short side to `size` (bicubic), centre crop `size`, normalise (the probing protocol)."""
    size: int = 224
    mean: Sequence[float] = (0.485, 0.456, 0.406)
    std: Sequence[float] = (0.229, 0.224, 0.225)

    def __call__(self, img: torch.Tensor, rng: random.Random | None = None) -> torch.Tensor:
        img = TF.resize(img, [self.size], interpolation=BICUBIC, antialias=True)
        return to_normalized_float(TF.center_crop(img, [self.size, self.size]), self.mean, self.std)


# ----------------------------------------------------------------------------- DINO photometric ops
def color_jitter(img: torch.Tensor, rng: random.Random, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.2, hue: float = 0.1) -> torch.Tensor:
    """torchvision ColorJitter: the four adjustments in a random order, factors drawn uniformly."""
    ops = [
        lambda x: TF.adjust_brightness(x, rng.uniform(max(0.0, 1 - brightness), 1 + brightness)),
        lambda x: TF.adjust_contrast(x, rng.uniform(max(0.0, 1 - contrast), 1 + contrast)),
        lambda x: TF.adjust_saturation(x, rng.uniform(max(0.0, 1 - saturation), 1 + saturation)),
        lambda x: TF.adjust_hue(x, rng.uniform(-hue, hue)),
    ]
    rng.shuffle(ops)
    for op in ops:
        img = op(img)
    return img


def gaussian_blur(img: torch.Tensor, rng: random.Random, sigma: Sequence[float] = (0.1, 2.0)) -> torch.Tensor:
    """DINO's PIL GaussianBlur(radius ~ U(0.1, 2)): a Gaussian of that sigma, kernel covering +-3 sigma."""
    s = rng.uniform(*sigma)
    k = 2 * math.ceil(3 * s) + 1
    k = min(k, 2 * ((min(img.shape[-2:]) - 1) // 2) + 1)  # the kernel must fit the image
    return TF.gaussian_blur(img, [k, k], [s, s])


@dataclass
class DinoMultiCrop:
    """2 global + N local crops with DINO's augmentations (facebookresearch/dino DataAugmentationDINO).

    Global crop 1: blur p=1.0; global crop 2: blur p=0.1, solarise p=0.2; local crops: blur p=0.5.
    All crops: flip p=0.5, colour jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2.
    """
    global_size: int = 224
    local_size: int = 96
    n_global: int = 2
    n_local: int = 10
    global_scale: Sequence[float] = (0.4, 1.0)
    local_scale: Sequence[float] = (0.05, 0.4)
    mean: Sequence[float] = (0.485, 0.456, 0.406)
    std: Sequence[float] = (0.229, 0.224, 0.225)
    blur_probs: Sequence[float] = field(default=(1.0, 0.1))  # per global crop; locals use 0.5
    solarize_probs: Sequence[float] = field(default=(0.0, 0.2))

    def _augment(self, img: torch.Tensor, rng: random.Random, blur_p: float, solarize_p: float) -> torch.Tensor:
        if rng.random() < 0.5:
            img = TF.horizontal_flip(img)
        if rng.random() < 0.8:
            img = color_jitter(img, rng)
        if rng.random() < 0.2:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if rng.random() < blur_p:
            img = gaussian_blur(img, rng)
        if rng.random() < solarize_p:
            img = TF.solarize(img, 128)
        return to_normalized_float(img, self.mean, self.std)

    def __call__(self, img: torch.Tensor, rng: random.Random) -> list[torch.Tensor]:
        crops = []
        for i in range(self.n_global):
            crop = random_resized_crop(img, rng, self.global_size, self.global_scale)
            crops.append(self._augment(crop, rng, self.blur_probs[i % 2], self.solarize_probs[i % 2]))
        for _ in range(self.n_local):
            crop = random_resized_crop(img, rng, self.local_size, self.local_scale)
            crops.append(self._augment(crop, rng, 0.5, 0.0))
        return crops  # n_global tensors (3, G, G), then n_local tensors (3, L, L)
