"""timm / original-DINO ViT -> clipdino `vit` export: parity on random weights, DINO layouts, CLI, clear errors."""
import pytest
import torch
from safetensors.torch import save_file

timm = pytest.importorskip("timm")

from models.convert.timm_vit import convert_timm_state_dict, load_timm_checkpoint, main  # noqa: E402
from models.export import load_export  # noqa: E402

TOL = 1e-5


class NotAWeight:
    """Anything torch.load(weights_only=True) must refuse."""


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter off its init (norm gains, biases, layer scale too), so a dropped or swapped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = perturbed(timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                        num_classes=10, init_values=0.1))  # layer scale + a classifier head
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.forward_head(model.forward_features(x), pre_logits=True)  # class token after the final norm
    return model, x, ref


def test_small_with_layer_scale_matches(small):
    model, x, ref = small
    vit, config = convert_timm_state_dict(model.state_dict())
    assert config["vision"]["heads"] == 6 and config["vision"]["layer_scale"] and config["vision"]["width"] == 384
    assert "head.weight" in config["dropped_keys"]
    assert (vit(x) - ref).abs().max().item() < TOL


def test_dino_b16_layout_and_training_checkpoint(tmp_path):
    torch.manual_seed(0)
    dino = perturbed(timm.create_model("vit_base_patch16_224.dino", pretrained=False))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = dino(x)  # num_classes=0: the normalised class token
    # a facebookresearch/dino training checkpoint: student (DDP) and teacher (MultiCropWrapper) with the DINO head
    teacher = {f"backbone.{k}": v for k, v in dino.state_dict().items()}
    teacher["head.last_layer.weight_g"] = torch.ones(4, 1)
    student = {"module.backbone.cls_token": torch.zeros(1, 1, 768)}  # (the real one is a whole DDP model)
    torch.save({"student": student, "teacher": teacher, "epoch": 3}, tmp_path / "checkpoint.pth")
    vit, config = load_timm_checkpoint(tmp_path / "checkpoint.pth")  # the teacher by default, as DINO evaluates
    assert config["vision"]["size"] == "base" and config["vision"]["patch_size"] == 16
    assert (vit(x) - ref).abs().max().item() < TOL


def test_released_file_cli_round_trip(small, tmp_path):
    model, x, ref = small
    torch.save(model.state_dict(), tmp_path / "dino_pretrain.pth")  # a plain backbone state dict, as DINO releases
    assert main([str(tmp_path / "dino_pretrain.pth"), "--out", str(tmp_path / "export")]) == 0
    loaded, cfg = load_export(tmp_path / "export")
    assert cfg["kind"] == "vit" and cfg["image_mean"] == [0.485, 0.456, 0.406] and cfg["vision"]["act"] == "gelu"
    with torch.no_grad():
        assert (loaded(x) - ref).abs().max().item() < TOL


def test_hub_folder_and_safetensors(small, tmp_path):
    model, x, ref = small
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text('{"architecture": "vit_small_patch16_224", "pretrained_cfg": '
                                          '{"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}')
    vit, config = load_timm_checkpoint(tmp_path)
    assert config["image_mean"] == [0.5] * 3
    assert (vit(x) - ref).abs().max().item() < TOL


def test_errors_name_the_keys(small, tmp_path, capsys):
    model, _, _ = small
    state = dict(model.state_dict())
    del state["blocks.1.mlp.fc2.weight"]
    with pytest.raises(ValueError, match=r"missing keys: blocks\.1\.mlp\.fc2\.weight"):
        convert_timm_state_dict(state)
    with pytest.raises(ValueError, match=r"unexpected timm ViT keys.*blocks\.0\.extra"):
        convert_timm_state_dict({**model.state_dict(), "blocks.0.extra.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"register tokens \(reg_token\)"):
        convert_timm_state_dict({**model.state_dict(), "reg_token": torch.zeros(1, 4, 384)})
    torch.save({"state_dict": model.state_dict(), "obj": NotAWeight()}, tmp_path / "pickled.pth")
    assert main([str(tmp_path / "pickled.pth"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "refusing to load" in err and "\n" not in err
    assert not (tmp_path / "x").exists()
