"""DALI pipelines: CLIP view, DINO multi-crop and evaluation, on webdataset shards.

The parameters come from the CPU path's transform objects (`ClipTransform`, `DinoMultiCrop`,
`EvalTransform`), so one config drives both backends. CPU-only mode (`decoder="cpu"`, no GPU,
`device_id=None`) and GPU decoding (`decoder="mixed"`) differ in the decoder's device only: every
later operator runs where its input lives. Differences from the CPU path are listed in docs/data.md
(colour jitter as one affine colour map with a YIQ-space hue rotation, DALI's crop-window sampling).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from data.transforms import ClipTransform, DinoMultiCrop, EvalTransform

IMAGE_EXT = "jpg;jpeg;png;webp"
RATIO = (3 / 4, 4 / 3)
SOLARIZE = [255 - v if v >= 128 else v for v in range(256)]  # torchvision solarize(threshold=128)
LUMA = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale weights: the grey of grayscale and contrast


@dataclass
class TrainSpec:
    """What one training batch holds: the CLIP view, the DINO crops, the caption bytes."""
    clip: Optional[ClipTransform] = None
    dino: Optional[DinoMultiCrop] = None
    text: bool = False

    def outputs(self) -> list[str]:
        """Names of the pipeline outputs, in order."""
        names = ["key"] + (["text"] if self.text else []) + (["image"] if self.clip else [])
        if self.dino:
            names += [f"crop{i}" for i in range(self.dino.n_global + self.dino.n_local)]
        return names


def _reader(shards: list[str], indexes: list[str], exts: list[str], shard_id: int, num_shards: int,
            shuffle_buffer: int, seed: int, order_seed: int, training: bool):
    from nvidia.dali import fn

    return fn.readers.webdataset(
        paths=shards, index_paths=indexes, ext=exts, name="reader", shard_id=shard_id, num_shards=num_shards,
        missing_component_behavior="error",  # validated shards have every component; fail at build otherwise
        random_shuffle=training and shuffle_buffer > 1, initial_fill=max(shuffle_buffer, 1), seed=seed,
        # training: the tar order is reshuffled every epoch with a seed shared by all ranks, so each epoch is a
        # fresh split of the samples over the ranks, every sample in exactly one rank's part
        shuffle_after_epoch=training, shuffle_after_epoch_seed=order_seed, pad_last_batch=not training)


def _decode(data, decoder: str):
    from nvidia.dali import fn, types

    return fn.decoders.image(data, device=decoder, output_type=types.RGB)  # (H, W, 3) uint8; "mixed" = GPU


def _random_resized_crop(img, size: int, scale: Sequence[float]):
    from nvidia.dali import fn, types

    return fn.random_resized_crop(img, size=[size, size], random_area=list(scale), random_aspect_ratio=list(RATIO),
                                  num_attempts=10, interp_type=types.INTERP_CUBIC, antialias=True)  # (S, S, 3) uint8


def _normalize(img, mean: Sequence[float], std: Sequence[float], mirror=None):
    from nvidia.dali import fn, types

    return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW", mean=[m * 255 for m in mean],
                                    std=[s * 255 for s in std], mirror=0 if mirror is None else mirror)  # (3, S, S)


def _gate(flag, value, neutral: float):
    """`value` where the per-sample coin `flag` is set, else `neutral` (no conditional split needed)."""
    return neutral + flag * (value - neutral)


def _colour_basis() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RGB matrices with  H(s, theta) = P0 + s cos(theta) P1 + s sin(theta) P2: saturation s and hue rotation theta
    in YIQ space. P0 maps to the luma grey (rgb_to_grayscale's weights), P1 = I - P0 keeps the chroma."""
    yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    p0 = np.ones((3, 1)) * np.array(LUMA)[None, :]
    rotate = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])  # d/dtheta of the I-Q rotation
    return p0, np.eye(3) - p0, np.linalg.inv(yiq) @ rotate @ yiq


def _colour_jitter(crop):
    """torchvision ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8, then RandomGrayscale p=0.2, as ONE affine colour map
    x -> M x + T per crop: M = b c H(s, theta), T = b (1 - c) mean_grey. Contrast blends towards the crop's mean
    grey (torchvision), hue/saturation act in YIQ; the four then commute, so torchvision's random order only
    changes where values clip (here once, at the end)."""
    from nvidia.dali import fn, math, types

    p0, p1, p2 = (types.Constant(m.astype(np.float32)) for m in _colour_basis())
    channel_mean = fn.reductions.mean(crop, axes=[0, 1])  # (3,)
    grey_mean = channel_mean[0] * LUMA[0] + channel_mean[1] * LUMA[1] + channel_mean[2] * LUMA[2]
    jitter = fn.random.coin_flip(probability=0.8, dtype=types.INT32)
    grey = fn.random.coin_flip(probability=0.2, dtype=types.INT32)
    brightness = _gate(jitter, fn.random.uniform(range=[0.6, 1.4]), 1.0)
    contrast = _gate(jitter, fn.random.uniform(range=[0.6, 1.4]), 1.0)
    saturation = _gate(jitter, fn.random.uniform(range=[0.8, 1.2]), 1.0) * (1 - grey)  # 0 = rgb_to_grayscale
    theta = _gate(jitter, fn.random.uniform(range=[-0.2 * np.pi, 0.2 * np.pi]), 0.0)  # hue 0.1 turn = 36 degrees
    scale = brightness * contrast
    matrix = scale * p0 + (scale * saturation * math.cos(theta)) * p1 + (scale * saturation * math.sin(theta)) * p2
    offset = brightness * (1.0 - contrast) * grey_mean
    return fn.coord_transform(crop, M=matrix, T=fn.stack(offset, offset, offset), dtype=types.UINT8)  # (S, S, 3)


def dino_view(img, size: int, scale: Sequence[float], blur_p: float, solarize_p: float, mean, std):
    """One DINO crop: crop -> colour jitter p=0.8 + grayscale p=0.2 -> blur -> solarise -> flip p=0.5 -> normalise."""
    from nvidia.dali import fn, types

    crop = _colour_jitter(_random_resized_crop(img, size, scale))  # (S, S, 3) uint8
    window = 2 * ((size - 1) // 2) + 1  # the kernel must fit the crop (as the CPU path clamps it)
    if blur_p >= 1.0:
        crop = _blur(crop, window)
    elif blur_p > 0.0 and fn.random.coin_flip(probability=blur_p, dtype=types.BOOL):
        crop = _blur(crop, window)
    if solarize_p > 0.0 and fn.random.coin_flip(probability=solarize_p, dtype=types.BOOL):
        crop = fn.lookup_table(crop, keys=list(range(256)), values=SOLARIZE, dtype=types.UINT8)
    return _normalize(crop, mean, std, mirror=fn.random.coin_flip(probability=0.5))


def _blur(crop, max_window: int):
    """Gaussian blur, sigma ~ U(0.1, 2), kernel 2*ceil(3 sigma)+1 clamped to the crop (as the CPU path)."""
    from nvidia.dali import fn, math, types

    sigma = fn.random.uniform(range=[0.1, 2.0])
    window = math.min(2 * math.ceil(3 * sigma) + 1, max_window)
    return fn.gaussian_blur(crop, sigma=sigma, window_size=fn.cast(window, dtype=types.INT32))


def build_train_pipeline(spec: TrainSpec, shards: list[str], indexes: list[str], batch_size: int, threads: int,
                         seed: int, order_seed: int, shard_id: int, num_shards: int, shuffle_buffer: int,
                         decoder: str = "cpu", device_id: Optional[int] = None, prefetch: int = 2,
                         checkpoint: Optional[str] = None):
    """A training pipeline whose outputs are `spec.outputs()`; `seed` drives this rank's shuffle buffer and
    augmentation, `order_seed` (the same on every rank) the tar order; `checkpoint` restores a saved state."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(enable_conditionals=True)
    def train():
        exts = [IMAGE_EXT] + (["txt"] if spec.text else [])
        read = _reader(shards, indexes, exts, shard_id, num_shards, shuffle_buffer, seed, order_seed, training=True)
        encoded, text = (read[0], read[1]) if spec.text else (read, None)
        outs = [fn.get_property(encoded, key="source_info")]  # "shard.tar:offset:member name"
        if spec.text:
            outs.append(text)
        img = _decode(encoded, decoder)
        if spec.clip:
            c = spec.clip
            outs.append(_normalize(_random_resized_crop(img, c.size, c.scale), c.mean, c.std))
        if spec.dino:
            d = spec.dino
            for i in range(d.n_global):
                outs.append(dino_view(img, d.global_size, d.global_scale, d.blur_probs[i % 2],
                                      d.solarize_probs[i % 2], d.mean, d.std))
            for _ in range(d.n_local):
                outs.append(dino_view(img, d.local_size, d.local_scale, 0.5, 0.0, d.mean, d.std))
        return tuple(outs)

    return train(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=seed,
                 prefetch_queue_depth=prefetch, enable_checkpointing=True, checkpoint=checkpoint)


def build_eval_pipeline(transform: EvalTransform, shards: list[str], indexes: list[str], batch_size: int,
                        threads: int, label_ext: str = "cls", shard_id: int = 0, num_shards: int = 1,
                        decoder: str = "cpu", device_id: Optional[int] = None):
    """Resize the short side to S (bicubic), centre crop S, normalise; outputs (key, image, label bytes)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def evaluate():
        encoded, label = _reader(shards, indexes, [IMAGE_EXT, label_ext], shard_id, num_shards, 0, 0, 0,
                                 training=False)
        img = fn.resize(_decode(encoded, decoder), resize_shorter=transform.size, interp_type=types.INTERP_CUBIC,
                        antialias=True)
        image = fn.crop_mirror_normalize(img, crop=[transform.size, transform.size], crop_pos_x=0.5, crop_pos_y=0.5,
                                         dtype=types.FLOAT, output_layout="CHW",
                                         mean=[m * 255 for m in transform.mean], std=[s * 255 for s in transform.std])
        return fn.get_property(encoded, key="source_info"), image, label

    return evaluate(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=0)
