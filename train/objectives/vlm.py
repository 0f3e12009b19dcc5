"""The LLaVA-1.5 stage as one more objective of the one trainer: encoder -> projector -> causal LM.

The student is `LlavaTrainingStep`, a thin module around a stock transformers `LlavaForConditionalGeneration`
(models/vlm.py), so DeepSpeed (ZeRO-2 for stage 1, ZeRO-3 for stage 2) wraps it like any student, and the
export is the Llava model's own `save_pretrained` folder. Stage 1 and stage 2 differ only in config: what trains
(`model.train`), the template, the ZeRO stage and the numbers.

The forward is Llava's, with two things it leaves to the caller done here: labels at image positions are
masked (data/conversation.py gives -100 there), and text-only samples carry a zero image whose features are
not spliced in (LLaVA's way: the tower and projector then run in every step on every rank, which ZeRO-3's
parameter gathering needs). The loss is the mean cross-entropy over the micro-batch's supervised tokens, as
LLaVA's HF Trainer computes it, with the LM head applied only at supervised positions (no (B, T, vocab) logits
tensor: at 7B with a 32K vocabulary that is 4 GB per 16 x 2048-token micro-batch in fp32); "count/..." terms are summed over micro-batches and ranks for tokens/s and MFU.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.vlm_data import IGNORE_INDEX, VLMBatch
from models.atomic import atomic_folder
from models.vlm import vlm_step_flops
from train.objectives.base import Objective
from train.vlm_config import trainable_parts


class LlavaTrainingStep(nn.Module):
    """(batch tensors) -> (loss, supervised tokens). Calls the Llava model's own submodules."""

    def __init__(self, llava: nn.Module):
        super().__init__()
        self.llava = llava

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                pixel_values: torch.Tensor, has_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model, config = self.llava.model, self.llava.config
        features = model.get_image_features(pixel_values=pixel_values, vision_feature_layer=config.vision_feature_layer,
                                            vision_feature_select_strategy=config.vision_feature_select_strategy)
        features = torch.stack(list(features.pooler_output))  # (B, N, D): every image, dummies included
        embeds = model.get_input_embeddings()(input_ids)  # (B, T, D)
        image_positions = input_ids == config.image_token_id  # (B, T)
        # No host syncs here but one (below): the real images' features go first, in batch order (a stable sort,
        # where features[has_image] would sync for its size), and masked_scatter takes as many as there are image
        # tokens. data/conversation.py gives each image exactly N tokens; checked on the device, asynchronously.
        n = features.shape[1]
        torch._assert_async(image_positions.sum() == has_image.sum() * n,
                            f"image tokens != images x {n} features: the batch and the model's image_seq_length "
                            "disagree")
        order = torch.argsort((~has_image).to(torch.uint8), stable=True)  # (B,): images first, then text-only
        embeds = embeds.masked_scatter(image_positions.unsqueeze(-1), features[order].to(embeds.dtype))
        hidden = model.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                      use_cache=False).last_hidden_state
        keep = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): position t predicts token t+1
        # the head only where a label is: the same loss as logits everywhere, without a (B, T, V) tensor. The number
        # of supervised tokens S sizes the gather: the step's one data-dependent host sync
        rows, cols = keep.nonzero(as_tuple=True)  # (S,) each, row-major: the order of hidden[:, :-1][keep]
        logits = self.llava.lm_head(hidden[rows, cols])  # (S, V)
        supervised = keep.sum()
        loss = F.cross_entropy(logits.float(), labels[rows, cols + 1], reduction="sum") / supervised.clamp(min=1)
        # every image's features in the graph with weight 0 (exactly +0 to the loss and the gradients): a text-only
        # sample's dummy tower run too, so every rank runs (and reduces) the same parameters
        loss = loss + 0.0 * features.sum()
        return loss, supervised


class VLMObjective(Objective):
    name = "vlm"
    checkpoint_frozen = False  # frozen weights come back from model.vision / model.llm: checkpoints hold the rest

    def __init__(self, cfg, steps_per_epoch: int, total_steps: int):
        super().__init__(cfg, steps_per_epoch, total_steps)
        from data.conversation import get_template
        from models.vlm import build_llava, describe, load_projector, set_trainable

        m = cfg.model
        if not m.vision:
            raise ValueError("set model.vision (an encoder export folder: ours, or one from models.convert)")
        self.parts = trainable_parts(m.train)
        self.llava, self.processor = build_llava(m.vision, m.llm, projector=m.projector, vision_layer=m.vision_layer,
                                                 template=cfg.data.template, system_prompt=cfg.data.system_prompt,
                                                 seed=cfg.seed, attn_implementation=m.attn_implementation,
                                                 pad_images=cfg.data.image_aspect_ratio == "pad")
        image_tokens = self.llava.config.image_seq_length
        if cfg.data.max_length <= image_tokens + 1:
            raise ValueError(f"data.max_length={cfg.data.max_length} leaves no room for text beside the tower's "
                             f"{image_tokens} image tokens")
        self.template = get_template(cfg.data.template, cfg.data.system_prompt)
        self.projector_source = load_projector(self.llava, m.projector_from) if m.projector_from else ""
        set_trainable(self.llava, self.parts)
        self.llava.train()  # HF gradient checkpointing only acts in training mode
        self.student = LlavaTrainingStep(self.llava)
        self.sizes = describe(self.llava)

    # ------------------------------------------------------------------ data (the objective owns it)
    @classmethod
    def prepare_data(cls, cfg) -> None:
        d = cfg.data
        if d.generate_synthetic and not Path(d.train).exists():
            from data.vlm_synthetic import ensure_vlm_data

            ensure_vlm_data(d.synthetic_dir, stage1_samples=d.synthetic_stage1, stage2_samples=d.synthetic_stage2,
                            image_size=d.synthetic_image_size)
            if not Path(d.train).exists():
                raise ValueError(f"generated the synthetic instruction data in {d.synthetic_dir} but data.train="
                                 f"{d.train!r} is not in it")

    @classmethod
    def count_samples(cls, cfg) -> int:
        from data.shards import DataError
        from data.vlm_data import read_records

        records = read_records(cfg.data.train, cfg.data.image_folder)[0]
        if not records:
            raise DataError(f"data.train={cfg.data.train} holds no records")
        return len(records)

    def build_loader(self, micro: int, accum: int, rank: int, world: int, device_type: str):
        from data.vlm_data import ConversationDataset, modality_lengths, read_records
        from data.vlm_loader import VLMLoader

        d = self.cfg.data
        records, root = read_records(d.train, d.image_folder)
        dataset = ConversationDataset(records, root, self.processor, self.template,
                                      self.llava.config.image_seq_length, d.max_length)
        return VLMLoader(dataset, modality_lengths(records), micro, world, accum, rank, self.cfg.seed, d.workers,
                         d.group_by_modality_length, self.processor.tokenizer.pad_token_id, d.max_skipped,
                         pin_memory=device_type == "cuda")

    def data_processor(self):
        return self.processor

    # ------------------------------------------------------------------ step
    def compute_loss(self, student: Callable, batch: VLMBatch, step: int) -> dict[str, torch.Tensor]:
        loss, supervised = student(batch.input_ids, batch.attention_mask, batch.labels, batch.pixel_values,
                                   batch.has_image)
        lengths = batch.attention_mask.sum(1).float()  # (B,)
        return {"loss": loss, "count/tokens": supervised.float(), "count/input_tokens": lengths.sum(),
                "count/token_sq": (lengths * lengths).sum(),
                "count/samples": torch.full((), float(len(batch)), device=lengths.device)}  # no H2D copy + sync

    def configure_grad_checkpointing(self) -> None:
        if self.cfg.model.grad_checkpointing:
            kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
            self.llava.model.language_model.gradient_checkpointing_enable(**kwargs)
            if "vision" in self.parts:
                self.llava.model.vision_tower.gradient_checkpointing_enable(**kwargs)

    def group_of(self, param_name: str) -> str:
        return "vision" if ".vision_tower." in param_name else ""

    def lr_scale(self, group_name: str, step: int) -> float:
        vision_lr = self.cfg.model.vision_lr
        if group_name.startswith("vision") and vision_lr is not None:
            return vision_lr / self.cfg.optim.lr
        return 1.0

    def no_weight_decay_names(self) -> set[str]:
        return set()

    def vision_tower(self) -> nn.Module:
        return self.llava.model.vision_tower

    # ------------------------------------------------------------------ FLOPs
    def flops_per_step(self, counts: dict[str, float], global_batch: int) -> float:
        return vlm_step_flops(self.llava.config, self.sizes, self.parts, counts)

    def flops_per_sample(self) -> float:
        return 0.0  # variable length: the metrics row uses flops_per_step

    # ------------------------------------------------------------------ export
    def write_export(self, engine, out_dir: Path, meta: dict[str, Any], zero_stage: int, is_main: bool) -> None:
        """`save_pretrained` of the Llava model + processor (tokenizer with its chat template); ZeRO-3 shards are
        gathered parameter by parameter to rank 0 (a collective: every rank calls this)."""
        state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
        if not is_main:
            return
        if state is not None:
            state = {k.removeprefix("llava."): v for k, v in state.items()}
        else:
            state = {k: v.detach().cpu() for k, v in self.llava.state_dict().items()}
        export_dtype = torch.bfloat16 if self.cfg.model.export_dtype == "bfloat16" else torch.float32
        state = {k: v.to(export_dtype) if v.is_floating_point() else v for k, v in state.items()}
        bad = [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise ValueError(f"refusing to export non-finite weights ({bad[0]} and {len(bad) - 1} more)")
        with atomic_folder(out_dir) as tmp:
            dtype, self.llava.config.dtype = self.llava.config.dtype, export_dtype  # what from_pretrained loads as
            try:
                self.llava.save_pretrained(tmp, state_dict=state)
            finally:
                self.llava.config.dtype = dtype
            tokenizer = self.processor.tokenizer  # the export pads on the left: batched generation
            side, saved = tokenizer.padding_side, tokenizer.init_kwargs.get("padding_side")
            tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
            try:
                self.processor.save_pretrained(tmp)
            finally:
                tokenizer.padding_side, tokenizer.init_kwargs["padding_side"] = side, saved
            (tmp / "clipdino_vlm.json").write_text(json.dumps({**meta, "template": self.template.name,
                                                               "vision": self.cfg.model.vision,
                                                               "llm": self.cfg.model.llm,
                                                               "projector_from": self.projector_source}, indent=2))

    def export(self):
        raise NotImplementedError("the VLM writes a transformers folder (write_export)")

