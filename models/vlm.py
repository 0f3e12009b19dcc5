"""The VLM of the LLaVA-1.5 stage, built as what the ecosystem already loads: a transformers
`LlavaForConditionalGeneration` whose tower is the native vision model our encoder maps onto
(`models/convert/to_hf.py`: `clip_vision_model` for the pre-norm ViT, `vit` / `dinov2` otherwise).

    model, processor = build_llava("runs/tiny_clip/export/step_0000300", "tiny-llama", template="vicuna_v1")
    model.save_pretrained(out); processor.save_pretrained(out)       # loads with stock transformers

Projector from a string (LLaVA's `mm_projector_type`): `mlp2x_gelu` = Linear, GELU, Linear (transformers'
`LlavaMultiModalProjector`, exactly); `linear` = one Linear, expressed in the same native class as `linear_1`
with an identity activation and a frozen identity `linear_2` (so the export stays a stock Llava folder).
The pieces are assembled without copies: the Llava shell is built on the meta device and given the tower, the
LLM's body and head, and a freshly initialised projector (torch's nn.Linear init, as LLaVA's).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

PROJECTORS = ("linear", "mlp2x_gelu")
IMAGE_TOKEN = "<image>"


def load_encoder_tower(export_dir: str):
    """(HF vision model, image mean, image std, our ViT config) from an encoder export (kind vit or clip)."""
    from transformers import AutoModel

    from models.convert.to_hf import hf_vision_from_vit
    from models.export import load_export

    module, config = load_export(export_dir)
    vit = module.visual if config["kind"] == "clip" else module
    vision_config, state = hf_vision_from_vit(vit, purpose="llava")
    tower = AutoModel.from_config(vision_config)
    tower.load_state_dict(state, strict=True)
    mean = config.get("image_mean") or [0.48145466, 0.4578275, 0.40821073]
    std = config.get("image_std") or [0.26862954, 0.26130258, 0.27577711]
    return tower, list(mean), list(std), vit.cfg


def build_llava(vision_export: str, llm: str, *, projector: str = "mlp2x_gelu", vision_layer: int = -2,
                template: str = "plain", system_prompt: Optional[str] = None, seed: int = 0,
                llm_cache: str = "data_cache/llm", attn_implementation: str = "sdpa", pad_images: bool = True):
    """(LlavaForConditionalGeneration, LlavaProcessor) from an encoder export and a causal LM spec."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from data.conversation import get_template, prepare_tokenizer
    from models.llm import load_llm

    if projector not in PROJECTORS:
        raise ValueError(f"model.projector={projector!r}: choose {' or '.join(PROJECTORS)}")
    tower, mean, std, vit_cfg = load_encoder_tower(vision_export)
    depth = vit_cfg.depth
    if not -depth <= vision_layer <= depth:
        raise ValueError(f"model.vision_layer={vision_layer} is outside the tower's hidden states (depth {depth})")
    lm, tokenizer = load_llm(llm, torch.float32, seed, llm_cache, attn_implementation)
    conv = get_template(template, system_prompt)
    prepare_tokenizer(tokenizer, conv, IMAGE_TOKEN)
    _resize_embeddings(lm, len(tokenizer))

    grid = vit_cfg.image_size // vit_cfg.patch_size
    config = LlavaConfig(vision_config=tower.config, text_config=lm.config,
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_seq_length=grid * grid,
                         vision_feature_layer=vision_layer, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu" if projector == "mlp2x_gelu" else "linear",
                         multimodal_projector_bias=True,
                         tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)))
    config.pad_token_id = tokenizer.pad_token_id
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = tower
    model.model.language_model = lm.model
    model.lm_head = lm.lm_head
    model.model.multi_modal_projector = LlavaMultiModalProjector(config)  # torch's nn.Linear init, as LLaVA's
    if projector == "linear":
        second = model.model.multi_modal_projector.linear_2
        with torch.no_grad():
            second.weight.copy_(torch.eye(second.out_features))
            second.bias.zero_()
        second.requires_grad_(False)
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise RuntimeError(f"VLM assembly left parameters unset: {meta[:3]}")
    model.generation_config = lm.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = build_processor(tokenizer, conv.chat_template, vit_cfg.image_size, vit_cfg.patch_size, mean, std,
                                pad_images)
    return model.train(), processor


def _resize_embeddings(lm: nn.Module, vocab: int) -> None:
    """Grow the embeddings (and an untied head) to the tokenizer; new rows = the mean of the old ones (no RNG
    draw, so initial weights do not depend on how many tokens were added). The `<image>` row is never read
    (image features replace it), the pad row only at masked positions."""
    old = lm.get_input_embeddings().weight.shape[0]
    if vocab <= old:
        return
    lm.resize_token_embeddings(vocab, mean_resizing=False)
    with torch.no_grad():
        emb = lm.get_input_embeddings().weight
        emb[old:] = emb[:old].mean(0, keepdim=True)
        head = lm.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != emb.data_ptr():
            head.weight[old:] = head.weight[:old].mean(0, keepdim=True)


def build_processor(tokenizer, chat_template: str, image_size: int, patch_size: int, mean, std, pad: bool = True):
    """LLaVA-1.5's image preparation: pad to a square with the mean colour (`image_aspect_ratio pad`, stage 2; stage
    1's scripts leave the default `square`: no padding), resize the shortest edge to the tower's size (bicubic),
    centre crop, rescale, normalise with the tower's statistics."""
    from transformers import LlavaImageProcessor, LlavaProcessor

    image_processor = LlavaImageProcessor(do_pad=pad, size={"shortest_edge": image_size},
                                          crop_size={"height": image_size, "width": image_size},
                                          image_mean=list(mean), image_std=list(std), resample=3)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="default", chat_template=chat_template,
                          image_token=IMAGE_TOKEN, num_additional_image_tokens=1)


def set_trainable(model, parts: set[str]) -> None:
    """Stage 1: the projector; stage 2: projector + LLM; the tower only when asked. A `linear` projector's
    identity second layer stays frozen."""
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector
    projector.linear_1.requires_grad_(True)
    if model.config.projector_hidden_act != "linear":
        projector.linear_2.requires_grad_(True)
    if "llm" in parts:
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    if "vision" in parts:
        model.model.vision_tower.requires_grad_(True)


def load_projector(model, source: str) -> str:
    """Copy the projector of a stage-1 run (its newest export) or of a Llava export folder into `model`."""
    from safetensors import safe_open

    folder = Path(source)
    if (folder / "export").is_dir():
        exports = sorted(p for p in (folder / "export").iterdir() if p.name.startswith("step_"))
        if not exports:
            raise FileNotFoundError(f"model.projector_from={source}: the run has no export yet")
        folder = exports[-1]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model.projector_from={source}: no stage-1 run folder or Llava export "
                                f"(no export/step_* and no *.safetensors in {folder})")
    want = dict(model.model.multi_modal_projector.state_dict())
    source_config = folder / "config.json"
    if source_config.is_file():  # an mlp2x_gelu projector and a linear one have the same shapes: compare the kind
        theirs = json.loads(source_config.read_text()).get("projector_hidden_act")
        if theirs is not None and theirs != model.config.projector_hidden_act:
            def kind(act: str) -> str:
                return "linear" if act == "linear" else "mlp2x_gelu"

            raise ValueError(f"model.projector_from={folder}: its projector is {kind(theirs)}, this model's is "
                             f"{kind(model.config.projector_hidden_act)} (set model.projector to match stage 1)")
    found: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if "multi_modal_projector." in key:
                    found[key.split("multi_modal_projector.", 1)[1]] = f.get_tensor(key)
    if set(found) != set(want):
        raise ValueError(f"model.projector_from={folder}: projector keys {sorted(found)} do not match this model's "
                         f"{sorted(want)} (a different model.projector?)")
    for key, value in found.items():
        if value.shape != want[key].shape:
            raise ValueError(f"model.projector_from={folder}: {key} has shape {tuple(value.shape)}, this model needs "
                             f"{tuple(want[key].shape)} (another encoder or LLM than stage 1's?)")
    model.model.multi_modal_projector.load_state_dict(found)
    return str(folder)


def count_parameters(module: nn.Module, trainable: Optional[bool] = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def describe(model) -> dict[str, Any]:
    m = model.model
    return {"vision": count_parameters(m.vision_tower), "projector": count_parameters(m.multi_modal_projector),
            "llm": count_parameters(m.language_model) + (0 if model.config.tie_word_embeddings
                                                         else count_parameters(model.lm_head)),
            "trainable": count_parameters(model, True)}


def vlm_step_flops(config, sizes: dict[str, int], parts: set[str], counts: dict[str, float]) -> float:
    """Matmul FLOPs of one training step from its token counts: forward x1, + x1 for activation gradients of
    anything upstream of a trained part, + x1 for the weight gradients of trained parts. `counts`: summed
    "count/input_tokens" (non-pad tokens), "count/token_sq" (sum of squared sequence lengths: causal attention),
    "count/samples" (images through the tower, text-only samples' zero images included), "count/tokens"
    (supervised tokens: where the LM head runs)."""
    c, v = config.text_config, config.vision_config
    tokens, token_sq, images = counts["count/input_tokens"], counts["count/token_sq"], counts["count/samples"]
    body = sizes["llm"] - c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)  # no embedding lookups
    head = 2 * counts["count/tokens"] * c.vocab_size * c.hidden_size  # the head runs at supervised positions only
    llm_fwd = 2 * tokens * body + head + 2 * c.num_hidden_layers * c.hidden_size * token_sq
    llm_mult = 3 if "llm" in parts else 2  # a frozen LLM still back-propagates to the projector
    seq = config.image_seq_length + 1  # patches + class token through every tower layer
    tower_fwd = images * (2 * seq * sizes["vision"] + 4 * v.num_hidden_layers * v.hidden_size * seq * seq)
    projector_fwd = images * config.image_seq_length * 2 * sizes["projector"]
    return llm_mult * llm_fwd + (3 if "vision" in parts else 1) * tower_fwd + 3 * projector_fwd
