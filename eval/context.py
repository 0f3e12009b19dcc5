"""What an evaluation run works with: its settings, the loaded export(s), the data, memoised features."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from eval.data import EvalData
from eval.features import IMAGENET_MEAN, IMAGENET_STD, ExtractSettings, Features, extract_features

DEFAULT_TASKS = ("linear_probe", "knn", "zero_shot", "retrieval", "embedding")


@dataclass
class EvalSettings:
    checkpoint: str
    data: str
    out: str
    tasks: tuple[str, ...] = DEFAULT_TASKS
    label: Optional[str] = None  # synthetic world: the factor used as class label (default shape)
    compare: Optional[str] = None  # a second export for the embedding analysis (disagreement pairs)
    name: Optional[str] = None
    compare_name: Optional[str] = None
    image_size: Optional[int] = None  # default: each export's native vision.image_size
    normalize: str = "imagenet"  # imagenet (the probing protocol) | export (the export's image_mean / std)
    protocol: str = "corrected"  # linear probe: corrected | authors (leo1oel/ViT-linear-probing as it runs)
    probe_preset: str = "auto"  # auto | paper | small
    select_on: Optional[str] = None  # heldout | val (default: heldout; the authors protocol: val)
    probe_epochs: Optional[int] = None
    probe_grid_epochs: Optional[int] = None
    probe_batch_size: Optional[int] = None
    probe_drop_last: Optional[bool] = None  # drop each epoch's last partial batch (default: no)
    knn_preset: str = "default"  # default (k 20 on the shared features) | dino (eval_knn.py: its transform, 4 k)
    knn_k: Optional[int] = None  # default: the preset's (20; dino: 10, 20, 100, 200)
    knn_temperature: float = 0.07
    pairs_per_factor: int = 64
    max_pair_images: int = 2000  # images used for all-pairs statistics (subsampled above this)
    factor_probe_epochs: int = 30
    thresholds: str = "0.7,0.5,0.8,0.5"  # disagreement: A high, B low, B high, A low
    top_pairs: int = 8
    batch_size: int = 64
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))  # decoding processes
    device: str = "auto"
    precision: str = "fp32"
    cache_dir: Optional[str] = None  # None: no feature cache
    progress: bool = True
    seed: int = 0

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


@dataclass
class LoadedModel:
    name: str
    export_dir: Optional[str]
    module: nn.Module
    config: dict[str, Any]
    extract: ExtractSettings

    @property
    def kind(self) -> str:
        return self.config["kind"]

    @property
    def has_text(self) -> bool:
        return self.kind == "clip"


def default_name(config: dict[str, Any], folder: str) -> str:
    meta = config.get("meta") or {}
    base = meta.get("objective") or meta.get("converted_from") or config.get("kind", "model")
    step = meta.get("step")
    return f"{base}@{step}" if step is not None else f"{base}:{Path(folder).name}"


def extract_settings_for(config: dict[str, Any], settings: EvalSettings) -> ExtractSettings:
    if settings.normalize not in ("imagenet", "export"):
        raise ValueError(f"--normalize must be imagenet or export, got {settings.normalize!r}")
    size = settings.image_size or int(config["vision"]["image_size"])
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if settings.normalize == "export":
        mean, std = tuple(config.get("image_mean", mean)), tuple(config.get("image_std", std))
    return ExtractSettings(size, mean, std, settings.batch_size, settings.workers, settings.resolved_device(),
                           settings.precision, settings.progress)


def load_model(folder: str, settings: EvalSettings, name: Optional[str] = None) -> LoadedModel:
    """Load an export (errors: FileNotFoundError / ValueError with one-line messages)."""
    from models.export import load_export

    path = Path(folder)
    if not path.exists():
        raise FileNotFoundError(f"no export at {path}")
    if not path.is_dir():
        raise ValueError(f"{path} is a file; --checkpoint takes an export folder (config.json + model.safetensors)")
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ValueError(f"{path} is not a complete export (needs config.json and model.safetensors)")
    try:
        module, config = load_export(path)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as e:  # corrupt safetensors, bad JSON, ...
        raise ValueError(f"{path}: cannot load the export ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    return LoadedModel(name or default_name(config, folder), str(path), module, config,
                       extract_settings_for(config, settings))


@dataclass
class EvalContext:
    settings: EvalSettings
    data: EvalData
    model: LoadedModel
    compare: Optional[LoadedModel] = None
    out: Path = Path(".")
    log: Callable[[str], None] = print
    _features: dict[tuple[str, str], Features] = field(default_factory=dict)
    timings: dict[str, dict[str, Any]] = field(default_factory=dict)  # "model/split" -> seconds, images, cached

    @property
    def device(self) -> str:
        return self.settings.resolved_device()

    def features(self, split: str, model: Optional[LoadedModel] = None,
                 extract: Optional[ExtractSettings] = None) -> Features:
        """Memoised (and disk-cached when a cache dir is set) features of a split under a model; `extract`
        (a protocol's own transform / token, named by its `variant`) instead of the model's shared settings."""
        model = model or self.model
        extract = extract or model.extract
        key = (model.name, split, extract.variant)
        if key not in self._features:
            start = time.perf_counter()
            feats = extract_features(model.module, model.kind, self.data, split, extract,
                                     export_dir=model.export_dir, cache_dir=self.settings.cache_dir, log=self.log)
            seconds = time.perf_counter() - start
            name = f"{model.name}/{split}" + (f"[{extract.variant}]" if extract.variant else "")
            self.timings[name] = {"seconds": seconds, "images": len(feats),
                                  "images_per_s": len(feats) / max(seconds, 1e-9), "cached": feats.from_cache}
            self._features[key] = feats
        return self._features[key]

    def models(self) -> list[LoadedModel]:
        return [self.model] + ([self.compare] if self.compare is not None else [])


def env_cache_dir() -> str:
    return os.environ.get("CLIPDINO_EVAL_CACHE", str(Path.home() / ".cache" / "clipdino" / "eval_features"))
