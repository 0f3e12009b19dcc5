"""One Vision Transformer for every objective (CLIP, SigLIP, DINO flavours by flags).

    vit = VisionTransformer(ViTConfig(size="base", patch_size=16, image_size=224))
    feats = vit.forward_features(images)   # {"cls": (B, W), "patch": (B, N, W), "registers": (B, R, W)}
    hidden = vit.forward_intermediates(images, [-2])   # [(B, 1+R+N, W)] block outputs, pre-norm (LLaVA layer -2)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.transformer import Block, init_weights, run_blocks

VIT_INITS = ("trunc_normal", "scaled", "open_clip")

# width, depth, heads (MLP ratio 4). "micro" keeps the CPU embedded default fast.
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "micro": (128, 4, 4),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}


# widths whose stock ViTs do not use 64-wide heads: ViT-H (1280 / 16 = 80), ViT-g (1408 / 16 = 88),
# ViT-bigG / gigantic (1664 / 16 = 104); every other stock ViT (Ti, S, B, L, DINOv2-g 1536 / 24) uses 64
_WIDE_HEAD_WIDTHS = {1280: 16, 1408: 16, 1664: 16}


def default_heads(width: int, depth: int) -> int:
    """Head count of a stock ViT with this width and depth (weights do not show it): our named sizes first,
    then the known wide-head widths, else width // 64."""
    named = next((h for w, d, h in VIT_SIZES.values() if (w, d) == (width, depth)), None)
    return named or _WIDE_HEAD_WIDTHS.get(width) or max(1, width // 64)


@dataclass
class ViTConfig:
    size: str = "base"
    patch_size: int = 16
    image_size: int = 224
    width: Optional[int] = None  # overrides the size's width / depth / heads when set
    depth: Optional[int] = None
    heads: Optional[int] = None
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path: float = 0.0
    layer_scale: Optional[float] = None
    num_registers: int = 0
    pre_norm: bool = False  # CLIP's ln_pre
    norm_eps: float = 1e-6  # DINO 1e-6; open_clip 1e-5
    patch_bias: bool = True  # open_clip's conv1 has no bias
    attn_backend: str = "sdpa"
    act: str = "gelu"  # gelu | quick_gelu (OpenAI CLIP weights)
    # trunc_normal (timm / DINO: std 0.02) | scaled (OpenAI CLIP: from width, depth) | open_clip (its VisionTransformer)
    init: str = "trunc_normal"

    def resolved(self) -> "ViTConfig":
        if self.size not in VIT_SIZES:
            raise ValueError(f"unknown ViT size {self.size!r}; choose from {', '.join(VIT_SIZES)}")
        if self.init not in VIT_INITS:
            raise ValueError(f"unknown ViT init {self.init!r}; choose from {', '.join(VIT_INITS)}")
        width, depth, heads = VIT_SIZES[self.size]
        return ViTConfig(**{**asdict(self), "width": self.width or width, "depth": self.depth or depth,
                            "heads": self.heads or heads})


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        cfg = cfg.resolved()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image size {cfg.image_size} is not a multiple of patch size {cfg.patch_size}")
        self.cfg = cfg
        self.width = W = cfg.width
        self.patch_size = cfg.patch_size
        self.grid = cfg.image_size // cfg.patch_size
        self.num_prefix_tokens = 1 + cfg.num_registers
        self.grad_checkpointing = False

        self.patch_embed = nn.Conv2d(3, W, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, W))
        self.reg_tokens = nn.Parameter(torch.zeros(1, cfg.num_registers, W)) if cfg.num_registers else None
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid, W))  # cls + patches
        self.norm_pre = nn.LayerNorm(W, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        dpr = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear decay rule
        self.blocks = nn.ModuleList(
            Block(W, cfg.heads, cfg.mlp_ratio, cfg.qkv_bias, dpr[i], cfg.layer_scale, cfg.norm_eps, cfg.attn_backend,
                  cfg.act)
            for i in range(cfg.depth))
        self.norm = nn.LayerNorm(W, eps=cfg.norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        """trunc_normal: timm / DINO (linear std 0.02, CLS ~1e-6). scaled: OpenAI CLIP's width- and depth-scaled
        normals, which open_clip applies to its text tower (CLS and positions W^-0.5, qkv W^-0.5, attention out and
        fc2 W^-0.5 (2 depth)^-0.5, fc1 (2W)^-0.5). open_clip: what open_clip's VisionTransformer trains from
        (`_init_open_clip`). At small widths std 0.02 leaves the blocks near identity: every image starts with
        almost the same CLS feature (mean cosine 0.996 between synthetic images for the micro ViT, 0.85 with
        scaled) and a contrastive loss sits at ln(batch) for longer (docs/eval.md)."""
        if self.cfg.init == "trunc_normal":  # (this draw order reproduces earlier runs bit for bit)
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.normal_(self.cls_token, std=1e-6)
            if self.reg_tokens is not None:
                nn.init.normal_(self.reg_tokens, std=1e-6)
            self.apply(init_weights)
            return
        if self.cfg.init == "open_clip":
            self._init_open_clip()
            return
        self.apply(init_weights)
        W, depth = self.width, len(self.blocks)
        for param in (self.cls_token, self.pos_embed, self.reg_tokens):
            if param is not None:
                nn.init.normal_(param, std=W ** -0.5)
        residual_std = W ** -0.5 * (2 * depth) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=W ** -0.5)
            nn.init.normal_(block.attn.proj.weight, std=residual_std)
            nn.init.normal_(block.mlp.fc1.weight, std=(2 * W) ** -0.5)
            nn.init.normal_(block.mlp.fc2.weight, std=residual_std)

    def _init_open_clip(self) -> None:
        """open_clip's VisionTransformer (open_clip/transformer.py): `class_embedding` and `positional_embedding` are
        `width ** -0.5 * torch.randn` and its `init_parameters` is a no-op ("OpenAI CLIP did not define an init"), so
        every layer keeps PyTorch's default: the patch conv (no bias there: `patch_bias=False`) and the Linears
        (MLP c_fc / c_proj, attention out_proj) kaiming_uniform(a=sqrt 5), i.e. U(+-1/sqrt(fan_in)), their biases
        U(+-1/sqrt(fan_in)); nn.MultiheadAttention's `_reset_parameters`: in_proj_weight, the same (3W, W) matrix as
        our qkv.weight, xavier_uniform (U(+-sqrt(6 / 4W))), in_proj_bias and out_proj.bias zero; LayerNorms 1 / 0
        (eps 1e-5 there: `norm_eps`). Registers (open_clip has none) are drawn like the class embedding."""
        W = self.width
        for param in (self.cls_token, self.pos_embed, self.reg_tokens):
            if param is not None:
                nn.init.normal_(param, std=W ** -0.5)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear, nn.LayerNorm)):
                module.reset_parameters()  # PyTorch's defaults, as open_clip leaves them
        for block in self.blocks:
            nn.init.xavier_uniform_(block.attn.qkv.weight)  # (3W, W): fan_in W, fan_out 3W, as in_proj_weight
            if block.attn.qkv.bias is not None:
                nn.init.zeros_(block.attn.qkv.bias)
            nn.init.zeros_(block.attn.proj.bias)

    # ------------------------------------------------------------------ embedding
    def interpolate_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Position embedding for an (h, w) patch grid: bicubic resize of the learned grid."""
        pos = self.pos_embed  # (1, 1+G*G, W)
        if h == self.grid and w == self.grid:
            return pos
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        patch_pos = patch_pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)  # (1, W, G, G)
        patch_pos = F.interpolate(patch_pos.float(), size=(h, w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, h * w, -1)  # (1, h*w, W)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1+R+N, W): cls, registers, patches."""
        x = self.patch_embed(images)  # (B, W, h, w)
        B, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, W)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.interpolate_pos_embed(h, w)
        if self.reg_tokens is not None:  # registers carry no position (DINOv2-reg)
            x = torch.cat([x[:, :1], self.reg_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        return self.norm_pre(x)

    # ------------------------------------------------------------------ forward API
    def forward_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x, _ = run_blocks(self.blocks, self.embed(images), self.grad_checkpointing)
        x = self.norm(x)  # (B, 1+R+N, W)
        R = self.num_prefix_tokens
        return {"cls": x[:, 0], "registers": x[:, 1:R], "patch": x[:, R:]}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised class-token feature (B, W)."""
        return self.forward_features(images)["cls"]

    def forward_intermediates(self, images: torch.Tensor, indices: Sequence[int], norm: bool = False
                              ) -> list[torch.Tensor]:
        """Outputs of the given blocks (negative = from the end: -1 last, -2 the one before), (B, 1+R+N, W).

        Stops after the deepest requested block, so layer -2 costs one block less than a full pass.
        """
        depth = len(self.blocks)
        wanted = [i % depth for i in indices]
        if any(not -depth <= i < depth for i in indices):
            raise IndexError(f"block index out of range for depth {depth}: {list(indices)}")
        _, kept = run_blocks(self.blocks[: max(wanted) + 1], self.embed(images), self.grad_checkpointing,
                             collect=set(wanted))
        return [self.norm(kept[i]) if norm else kept[i] for i in wanted]

    # ------------------------------------------------------------------ training helpers
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "reg_tokens"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def resize_pos_embed(self, image_size: int) -> None:
        """Permanently change the native image size (e.g. fine-tune at a higher resolution)."""
        grid = image_size // self.patch_size
        with torch.no_grad():
            new = self.interpolate_pos_embed(grid, grid).clone()
        self.pos_embed = nn.Parameter(new)
        self.grid = grid
        self.cfg.image_size = image_size


def vit_config_from(cfg, **extra) -> ViTConfig:
    """ViTConfig from the training config's `model.vision` section (a train.config.VisionConfig)."""
    return ViTConfig(size=cfg.size, patch_size=cfg.patch_size, image_size=cfg.image_size, drop_path=cfg.drop_path,
                     layer_scale=cfg.layer_scale, num_registers=cfg.num_registers, pre_norm=cfg.pre_norm,
                     qkv_bias=cfg.qkv_bias, attn_backend=cfg.attn_backend, init=cfg.init, norm_eps=cfg.norm_eps,
                     patch_bias=cfg.patch_bias, **extra)

