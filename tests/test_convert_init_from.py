"""An export as pretraining initialisation: strict copy of the vision tower, position table resized."""
from dataclasses import asdict

import pytest
import torch

from models.clip import CLIP
from models.convert.init_from import init_vision_from_export
from models.export import save_export
from models.text import TextTowerConfig, TextTransformer
from models.vit import ViTConfig, VisionTransformer


def test_init_from_vit_and_clip_exports(tmp_path):
    torch.manual_seed(0)
    cfg = ViTConfig(size="micro", patch_size=8, image_size=32)
    src = VisionTransformer(cfg)
    save_export(tmp_path / "vit", src, "vit", {"vision": asdict(src.cfg)})
    fresh = VisionTransformer(cfg)
    init_vision_from_export(fresh, tmp_path / "vit")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh(x), src(x))

    clip = CLIP(VisionTransformer(cfg), TextTransformer(TextTowerConfig(vocab_size=50, width=32, heads=2, layers=1,
                                                                         context_length=8)), 16)
    save_export(tmp_path / "clip", clip, "clip", {"vision": asdict(clip.visual.cfg), "embed_dim": 16,
                                                  "text": {"type": "transformer", **asdict(clip.text.cfg)}})
    bigger = VisionTransformer(ViTConfig(size="micro", patch_size=8, image_size=64))  # 8x8 grid from a 4x4 one
    init_vision_from_export(bigger, tmp_path / "clip")
    assert torch.equal(bigger.blocks[0].attn.qkv.weight, clip.visual.blocks[0].attn.qkv.weight)
    assert torch.allclose(bigger.pos_embed, clip.visual.interpolate_pos_embed(8, 8))

    other = VisionTransformer(ViTConfig(size="micro", patch_size=8, image_size=32, act="quick_gelu", depth=2))
    with pytest.raises(ValueError, match=r"architecture differs \(depth: export 4, model 2; act"):
        init_vision_from_export(other, tmp_path / "vit")
