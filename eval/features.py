"""Feature extraction (last-layer CLS, + joint-space image embeddings for CLIP exports), cached on disk.

    feats = extract_features(model, config, data, "val", settings, export_dir=..., cache_dir=...)
    feats.cls  # (N, D) final-norm CLS tokens     feats.embeds  # (N, E) L2-normalised, clip exports only

By default images go through `data.transforms.EvalTransform` (bicubic resize of the short side on the uint8
tensor, centre crop, normalise) and the feature is the CLS token after the final LayerNorm. A protocol that
copies a reference sets the other fields of ExtractSettings: `resize` (short side before the centre crop),
`interpolation`, `resize_backend="pil"` (torchvision's transforms on a PIL image, as the references run them)
and `cls_token="pre_final_norm"` (the last block's CLS before the final LayerNorm: HF CLIPVisionModel's
`last_hidden_state[:, 0]`). A cache entry is keyed by the export (resolved path, weight file size + mtime,
config.json content), the split's shards (names, sizes, mtimes), image size, mean / std, precision, those
fields when not the default, and FEATURE_VERSION, so a re-run with the same inputs loads instantly and any
change recomputes. Entries are a safetensors file + a JSON sidecar (keys, captions), written atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.functional as TVF
import torchvision.transforms.v2.functional as TF
from PIL import Image
from safetensors.torch import load_file, save_file
from torchvision.transforms import InterpolationMode
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from data.loader import pil_to_uint8
from data.shards import count_samples
from data.transforms import EvalTransform, to_normalized_float
from eval.data import EvalData, decode_sample, iter_samples

FEATURE_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Features:
    keys: list[str]
    cls: torch.Tensor  # (N, D) float32
    labels: torch.Tensor  # (N,) int64, -1 = no label
    captions: list[str]
    embeds: Optional[torch.Tensor] = None  # (N, E) float32, unit norm (clip exports)
    factors: Optional[torch.Tensor] = None  # (N, F) int64 (synthetic world)
    from_cache: bool = False

    def __len__(self) -> int:
        return len(self.keys)


INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}
CLS_TOKENS = ("final_norm", "pre_final_norm")


@dataclass
class ExtractSettings:
    image_size: int  # the centre crop (and the model's input size)
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    batch_size: int = 64
    workers: int = 2
    device: str = "cpu"
    precision: str = "fp32"  # fp32 | bf16 (autocast, CUDA only)
    progress: bool = True
    resize: Optional[int] = None  # short side before the centre crop (None: image_size)
    interpolation: str = "bicubic"  # bicubic | bilinear
    resize_backend: str = "tensor"  # tensor (uint8 tensor, antialiased) | pil (torchvision on a PIL image)
    cls_token: str = "final_norm"  # final_norm | pre_final_norm (the last block's CLS, before the final LayerNorm)
    variant: str = ""  # a protocol's name for non-default settings ("authors", "dino_knn"): memo and timing keys

    def non_default(self) -> dict[str, Any]:
        """The protocol fields that differ from the default extraction (part of the cache key)."""
        fields_ = {"resize": self.resize if self.resize not in (None, self.image_size) else None,
                   "interpolation": self.interpolation, "resize_backend": self.resize_backend,
                   "cls_token": self.cls_token}
        defaults = {"resize": None, "interpolation": "bicubic", "resize_backend": "tensor", "cls_token": "final_norm"}
        return {k: v for k, v in fields_.items() if v != defaults[k]}

    def transform(self) -> Callable:
        if self.interpolation not in INTERPOLATIONS or self.resize_backend not in ("tensor", "pil"):
            raise ValueError(f"unknown interpolation {self.interpolation!r} / resize backend {self.resize_backend!r}")
        if self.cls_token not in CLS_TOKENS:
            raise ValueError(f"cls_token must be one of {', '.join(CLS_TOKENS)}, got {self.cls_token!r}")
        rest = {k: v for k, v in self.non_default().items() if k != "cls_token"}
        if not rest:
            return EvalTransform(self.image_size, tuple(self.mean), tuple(self.std))
        return ResizeCropTransform(self.resize or self.image_size, self.image_size, self.interpolation,
                                   self.resize_backend, tuple(self.mean), tuple(self.std))


@dataclass
class ResizeCropTransform:
    """Resize the short side to `resize`, centre crop `crop`, normalise. With backend "pil" the uint8 image goes
    through torchvision's PIL path, i.e. what `transforms.Resize(resize, interpolation)` + `CenterCrop(crop)` +
    `ToTensor()` + `Normalize` do to the PIL image a torchvision ImageFolder decodes (leo1oel/ViT-linear-probing,
    facebookresearch/dino eval_knn.py); "tensor" resizes the uint8 tensor with antialiasing (data.transforms)."""
    resize: int
    crop: int
    interpolation: str = "bicubic"
    backend: str = "tensor"
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD

    def __call__(self, img: torch.Tensor, rng: Any = None) -> torch.Tensor:
        mode = INTERPOLATIONS[self.interpolation]
        if self.backend == "pil":
            pil = Image.fromarray(img.permute(1, 2, 0).numpy())  # (H, W, 3) uint8
            pil = TVF.center_crop(TVF.resize(pil, self.resize, interpolation=mode), [self.crop, self.crop])
            img = torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1)  # (3, crop, crop)
        else:
            img = TF.center_crop(TF.resize(img, [self.resize], interpolation=mode, antialias=True),
                                 [self.crop, self.crop])
        return to_normalized_float(img, self.mean, self.std)


class _ShardImages(IterableDataset):
    """Decoded, transformed samples; loader worker w reads shards w, w + n, ... (order restored afterwards)."""

    def __init__(self, data: EvalData, shards: list[Path], transform: Callable):
        self.data, self.shards, self.transform = data, shards, transform

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        mine = list(range(wid, len(self.shards), n))
        for local, position, sample in iter_samples([self.shards[i] for i in mine]):
            item = decode_sample(sample, self.data)
            item["image"] = self.transform(item["image"])  # (3, S, S) float
            item["order"] = (mine[local], position)
            yield item


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"images": torch.stack([it["image"] for it in items]), "keys": [it["key"] for it in items],
            "labels": [it["label"] for it in items], "captions": [it["caption"] for it in items],
            "factors": [it["factors"] for it in items], "order": [it["order"] for it in items]}


@torch.no_grad()
def encode_images(model: nn.Module, kind: str, images: torch.Tensor, cls_token: str = "final_norm"
                  ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(B, 3, S, S) -> (CLS (B, D), unit-norm joint embedding (B, E) or None), both float32.

    cls_token "pre_final_norm": the CLS of the last block's output, before the final LayerNorm (what HF
    CLIPVisionModel returns as `last_hidden_state[:, 0]`); the joint embedding is unchanged (it projects the
    normed CLS)."""
    vit = model.visual if kind == "clip" else model
    if cls_token == "pre_final_norm":
        pre = vit.forward_intermediates(images, [-1], norm=False)[0][:, 0]  # (B, D)
        cls, post = pre, vit.norm(pre)
    else:
        cls = post = vit(images)  # (B, D)
    if kind == "clip":
        return cls.float(), F.normalize(model.visual_proj(post).float(), dim=-1)
    return cls.float(), None


def _autocast(settings: ExtractSettings):
    if settings.precision == "bf16" and settings.device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def export_identity(export_dir: str | os.PathLike) -> dict[str, Any]:
    """What identifies an export's weights for caching (no full hash: ViT-B weights are 350 MB)."""
    folder = Path(export_dir).resolve()
    st = (folder / "model.safetensors").stat()
    config = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    return {"path": str(folder), "weights_bytes": st.st_size, "weights_mtime_ns": st.st_mtime_ns, "config": config}


def cache_key(identity: dict[str, Any], data: EvalData, split: str, settings: ExtractSettings) -> str:
    payload = {"version": FEATURE_VERSION, "export": identity, "data": data.fingerprint(split), "kind": data.kind,
               "label": data.label, "image_size": settings.image_size, "mean": list(settings.mean),
               "std": list(settings.std), "precision": settings.precision}
    if settings.non_default():  # default extractions keep the keys they always had
        payload["protocol"] = settings.non_default()
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def extract_features(model: nn.Module, kind: str, data: EvalData, split: str, settings: ExtractSettings,
                     export_dir: Optional[str | os.PathLike] = None, cache_dir: Optional[str | os.PathLike] = None,
                     log: Callable[[str], None] = lambda m: None) -> Features:
    """Features of every sample of `split`, from the cache when the same inputs were seen before."""
    path = None
    if cache_dir is not None and export_dir is not None:
        key = cache_key(export_identity(export_dir), data, split, settings)
        path = Path(cache_dir) / f"{split}-{key}.safetensors"
        if path.is_file() and path.with_suffix(".json").is_file():
            log(f"features: {split} from cache {path}")
            return load_features(path)
    feats = _run(model, kind, data, split, settings)
    if path is not None:
        save_features(feats, path)
    return feats


def _run(model: nn.Module, kind: str, data: EvalData, split: str, settings: ExtractSettings) -> Features:
    shards = data.shards(split)
    dataset = _ShardImages(data, shards, settings.transform())
    workers = min(settings.workers, len(shards))
    loader = DataLoader(dataset, batch_size=settings.batch_size, num_workers=workers, collate_fn=_collate,
                        pin_memory=settings.device.startswith("cuda"), persistent_workers=False)
    total = _expected_samples(data, shards)
    model = model.to(settings.device).eval()
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=total, unit="img", desc=f"features {split}", disable=not settings.progress, leave=False)

    def images() -> Iterator[torch.Tensor]:
        for batch in loader:
            rows.extend(dict(zip(("key", "label", "caption", "factors", "order"), r)) for r in zip(
                batch["keys"], batch["labels"], batch["captions"], batch["factors"], batch["order"]))
            bar.update(len(batch["keys"]))
            yield batch["images"].to(settings.device, non_blocking=True)

    with bar, torch.inference_mode():
        cls_all, emb_all = _encode_batches(model, kind, images(), settings)
    if not rows:
        raise ValueError(f"no samples in the {split} shards of {data.root}")
    order = sorted(range(len(rows)), key=lambda i: rows[i]["order"])  # archive order, whatever the workers did
    index = torch.tensor(order)
    rows = [rows[i] for i in order]
    factors = torch.tensor([r["factors"] for r in rows], dtype=torch.long) if rows[0]["factors"] is not None else None
    return Features(keys=[r["key"] for r in rows], cls=cls_all[index],
                    labels=torch.tensor([r["label"] for r in rows], dtype=torch.long),
                    captions=[r["caption"] for r in rows],
                    embeds=emb_all[index] if emb_all is not None else None, factors=factors)


def _encode_batches(model: nn.Module, kind: str, batches: Iterable[torch.Tensor], settings: ExtractSettings
                    ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """encode_images over (B, 3, S, S) batches already on the device -> (CLS (N, D), embeddings (N, E) or None)
    on the CPU, concatenated; (None, None) when there was no batch. The parts stay on the device until the loop
    ends (a per-batch .cpu() would wait for the GPU every batch) and come over part by part, so the device never
    holds a second, concatenated copy."""
    cls_parts, emb_parts = [], []
    with _autocast(settings):
        for images in batches:
            cls, emb = encode_images(model, kind, images, settings.cls_token)
            cls_parts.append(cls)
            if emb is not None:
                emb_parts.append(emb)
    if not cls_parts:
        return None, None
    return torch.cat([p.cpu() for p in cls_parts]), torch.cat([p.cpu() for p in emb_parts]) if emb_parts else None


def _expected_samples(data: EvalData, shards: list[Path]) -> Optional[int]:
    """The progress bar's total, when the folder has a sizes.json (without one, count_samples would read every
    tar header: a second pass over the data just for a progress bar)."""
    if not (data.root / "sizes.json").is_file():
        return None
    return count_samples([str(p) for p in shards]) or None


@torch.no_grad()
def encode_pil(model: nn.Module, kind: str, images: list, settings: ExtractSettings
               ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Features of in-memory PIL images (controlled pairs), batched like extract_features."""
    transform = settings.transform()
    model = model.to(settings.device).eval()
    batches = (torch.stack([transform(pil_to_uint8(im)) for im in images[start:start + settings.batch_size]]
                           ).to(settings.device) for start in range(0, len(images), settings.batch_size))
    return _encode_batches(model, kind, batches, settings)


def save_features(feats: Features, path: Path) -> None:
    tensors = {"cls": feats.cls.contiguous(), "labels": feats.labels.contiguous()}
    if feats.embeds is not None:
        tensors["embeds"] = feats.embeds.contiguous()
    if feats.factors is not None:
        tensors["factors"] = feats.factors.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    save_file(tensors, tmp)
    side = path.with_suffix(".json")
    side_tmp = f"{tmp}.json"
    Path(side_tmp).write_text(json.dumps({"keys": feats.keys, "captions": feats.captions}))
    os.replace(side_tmp, side)  # the sidecar first: an entry counts once its tensors file appears
    os.replace(tmp, path)


def load_features(path: Path) -> Features:
    tensors = load_file(str(path))
    side = json.loads(path.with_suffix(".json").read_text())
    return Features(keys=side["keys"], cls=tensors["cls"], labels=tensors["labels"], captions=side["captions"],
                    embeds=tensors.get("embeds"), factors=tensors.get("factors"), from_cache=True)


def settings_dict(settings: ExtractSettings) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items() if k != "progress"}
