"""Named evaluation protocols: the authors' linear probe as it runs (leo1oel/ViT-linear-probing) and DINO's kNN.

The references below are written from the authors' code (src/trainer.py, src/models.py, src/feature_extractor.py
of leo1oel/ViT-linear-probing, commit 02d453d) and from facebookresearch/dino eval_knn.py, and our
implementation is checked against them.
"""
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from conftest import REPO
from eval.features import ExtractSettings, encode_images
from eval.knn import KNN_PRESETS, knn_accuracies, knn_classify, knn_preset, preset_extract
from eval import linear_probe as lp
from eval.linear_probe import (PRESETS, ProbeBank, ProbeConfig, _train, authors_extract, authors_linear_probe,
                               authors_lr_factors, init_authors_heads, lr_factor, preset)

transformers = pytest.importorskip("transformers")

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# ----------------------------------------------------------------------------- the authors' code, as reference
def their_cosine_lr(optimizer, base_lrs, warmup_length, steps):
    """src/trainer.py: cosine_lr (with _warmup_lr and assign_learning_rate)."""
    if not isinstance(base_lrs, list):
        base_lrs = [base_lrs for _ in optimizer.param_groups]
    assert len(base_lrs) == len(optimizer.param_groups)

    def _lr_adjuster(step):
        for param_group, base_lr in zip(optimizer.param_groups, base_lrs):
            if step < warmup_length:
                lr = base_lr * (step + 1) / warmup_length
            else:
                e = step - warmup_length
                es = steps - warmup_length
                lr = 0.5 * (1 + np.cos(np.pi * e / es)) * base_lr
            param_group["lr"] = lr
    return _lr_adjuster


def their_final_run_lrs(n: int, dim: int, classes: int, batch_size: int, epochs: int, warmup_epochs: int,
                        best_lr: float) -> list[float]:
    """train_and_evaluate's final run + train_epoch, recording the LR each optimizer.step() uses."""
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.randn(n, dim), torch.arange(n) % classes)
    train_loader = DataLoader(data, batch_size=batch_size, shuffle=True)  # no drop_last in src/trainer.py
    model = nn.Linear(dim, classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=best_lr, weight_decay=0)
    steps_per_epoch = len(train_loader)
    total_steps = epochs * steps_per_epoch
    warmup_steps = warmup_epochs * steps_per_epoch
    scheduler = their_cosine_lr(optimizer, best_lr, warmup_steps, total_steps)
    used = []
    for epoch in range(epochs):
        for batch_idx, (x, target) in enumerate(train_loader):  # train_epoch
            optimizer.zero_grad()
            loss = nn.CrossEntropyLoss()(model(x), target)
            loss.backward()
            used.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if scheduler is not None:
                scheduler(batch_idx)
    return used


def clustered(n: int, classes: int, dim: int, seed: int, spread: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 2
    y = torch.arange(n) % classes
    return centres[y] + spread * torch.randn(n, dim, generator=g), y


# ----------------------------------------------------------------------------- linear probe: schedule
@pytest.mark.parametrize("warmup_epochs", [2, 0])
def test_authors_lr_sequence_matches_their_scheduler_usage(warmup_epochs):
    """10 samples in batches of 4 (3 steps, the last one partial), 4 epochs: the LR of every step of their final
    run, the restart every epoch included, equals ours, in the formula and in the probe's own training loop."""
    n, batch, epochs, lr = 10, 4, 4, 0.1
    reference = their_final_run_lrs(n, 6, 3, batch, epochs, warmup_epochs, lr)
    assert len(reference) == 12
    factors = authors_lr_factors(epochs, 3, warmup_epochs)
    assert [lr * f for f in factors] == pytest.approx(reference, rel=1e-12)
    assert reference[3:6] == reference[6:9] == reference[9:12]  # the sequence restarts every epoch
    corrected = [lr * lr_factor(s, 12, 3 * warmup_epochs) for s in range(12)]  # the default protocol's schedule
    assert corrected != pytest.approx(reference)

    x, y = clustered(n, 3, 6, 0)
    cfg = ProbeConfig(lrs=(lr,), weight_decays=(0.0,), epochs=epochs, warmup_epochs=warmup_epochs, grid_epochs=1,
                      batch_size=batch, select_on="val", protocol="authors")
    trace: list[float] = []
    authors_linear_probe(x, y, x, y, 3, cfg, lr_trace=trace)
    assert trace == pytest.approx(reference, rel=1e-12)
    if warmup_epochs:  # ten warm-up epochs (theirs) never leave the ramp: after step 0 at most lr / warm-up epochs
        assert max(trace[1:]) == pytest.approx(lr / warmup_epochs)


def test_authors_grid_constant_lr_head_init_and_val_selection(monkeypatch):
    """The grid trains fresh kaiming_normal(fan_out) / zero-bias heads at a constant LR; the point with the best
    val accuracy (the first of equals) goes to the final run, whose best val epoch is reported."""
    calls = []
    real_train = lp._train

    def spy(bank, points, x, y, epochs, warmup, batch, gen, ex, ey, track, factors=None, drop_last=False,
            lr_trace=None):
        calls.append({"points": list(points), "factors": list(factors), "epochs": epochs,
                      "weights": [h.weight.detach().clone() for h in bank.heads],
                      "biases": [h.bias.detach().clone() for h in bank.heads], "eval_x": ex})
        return real_train(bank, points, x, y, epochs, warmup, batch, gen, ex, ey, track, factors, drop_last, lr_trace)

    monkeypatch.setattr(lp, "_train", spy)
    classes, dim = 50, 512
    (xtr, ytr), (xva, yva) = clustered(400, classes, dim, 0), clustered(100, classes, dim, 1)
    cfg = ProbeConfig(lrs=(1e-4, 1e-3), weight_decays=(0.0, 1e-3), epochs=3, warmup_epochs=1, grid_epochs=2,
                      batch_size=64, select_on="val", protocol="authors")
    result = authors_linear_probe(xtr, ytr, xva, yva, classes, cfg)
    grid, final = calls
    assert grid["points"] == [(1e-4, 0.0), (1e-4, 1e-3), (1e-3, 0.0), (1e-3, 1e-3)] and grid["epochs"] == 2
    assert grid["factors"] == [1.0] * (2 * 7)  # scheduler=None in find_best_hyperparams: constant LR
    assert final["factors"][:7 * 3] == authors_lr_factors(3, 7, 1)
    for w, b in zip(grid["weights"] + final["weights"], grid["biases"] + final["biases"]):
        assert torch.all(b == 0)
        assert w.std().item() == pytest.approx((2 / classes) ** 0.5, rel=0.05)  # gain sqrt(2) / sqrt(fan_out)
    # selection and the reported number are both on val (z-scored with train statistics)
    mean, std = lp.authors_zscore_stats(xtr)
    assert torch.allclose(grid["eval_x"], (xva - mean) / std)
    accs = [g["selection_top1"] for g in result["grid"]]
    assert (result["lr"], result["weight_decay"]) == grid["points"][accs.index(max(accs))]
    assert result["selection_top1"] == result["top1"] and result["protocol"] == "authors"
    assert result["train_samples"] == 400 and result["steps_per_epoch"] == 7


def test_authors_head_init_is_their_linear_probe():
    """Same seed, same draws: their LinearProbe (nn.Linear, kaiming_normal_ fan_out, bias 0) and our head."""
    torch.manual_seed(3)
    theirs = nn.Linear(32, 10)
    nn.init.kaiming_normal_(theirs.weight, mode="fan_out")
    nn.init.constant_(theirs.bias, 0)
    torch.manual_seed(3)
    ours = init_authors_heads(ProbeBank(32, 10, 1)).heads[0]
    assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)
    torch.manual_seed(3)
    default = ProbeBank(32, 10, 1).heads[0]  # the corrected protocol keeps PyTorch's default init
    assert not torch.equal(default.weight, theirs.weight) and not torch.all(default.bias == 0)


def test_authors_zscore_population_std_plus_epsilon():
    x = torch.randn(50, 4) * torch.tensor([1.0, 2.0, 0.0, 3.0]) + 5
    mean, std = lp.authors_zscore_stats(x)
    ref = x.numpy()
    expected = (ref - ref.mean(0, keepdims=True)) / (ref.std(0, keepdims=True) + 1e-5)  # their FeatureDataset
    assert np.allclose(((x - mean) / std).numpy(), expected, atol=1e-4)


def test_drop_last_batching_and_presets():
    """drop_last keeps full batches only; the authors preset is what their code runs (batch 1024, last batch
    kept, val selection), the configured numbers otherwise."""
    x, y = clustered(10, 3, 6, 0)
    sizes = []
    for drop_last, expected in ((True, [4, 4] * 2), (False, [4, 4, 2] * 2)):
        sizes.clear()
        bank = ProbeBank(6, 3, 1)
        bank.register_forward_pre_hook(lambda m, args: sizes.append(len(args[0])) if m.training else None)
        trace: list[float] = []
        _train(bank, [(0.1, 0.0)], x, y, 2, 0, 4, torch.Generator().manual_seed(0), x, y, False,
               drop_last=drop_last, lr_trace=trace)
        assert [s for s in sizes if s < 10] == expected and len(trace) == len(expected)
    with pytest.raises(ValueError, match="make no batch of 16"):
        _train(ProbeBank(6, 3, 1), [(0.1, 0.0)], x, y, 1, 0, 16, torch.Generator(), x, y, False, drop_last=True)

    authors = PRESETS["authors"]
    assert (authors.lrs, authors.weight_decays) == ((1e-6, 1e-5, 1e-4, 1e-3), (0.0, 1e-6, 1e-3))
    assert (authors.epochs, authors.warmup_epochs, authors.grid_epochs) == (50, 10, 5)
    assert (authors.batch_size, authors.drop_last, authors.select_on) == (1024, False, "val")
    assert preset("auto", 1_281_167, protocol="authors") == authors
    assert preset("auto", 4000, protocol="authors") == authors  # their numbers whatever the data size
    paper = preset("paper", 10, protocol="authors", drop_last=True)
    assert (paper.batch_size, paper.drop_last, paper.select_on, paper.protocol) == (2048, True, "val", "authors")
    assert preset("auto", 4000, protocol="corrected") == PRESETS["small"]
    with pytest.raises(ValueError, match="chooses grid point and epoch on val"):
        preset("auto", 10, protocol="authors", select_on="heldout")


# ----------------------------------------------------------------------------- features of HF models
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)


def perturbed(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def hf_exports(tmp_path_factory):
    """A tiny random HF CLIPVisionModel and ViTModel, saved, converted with our converters and loaded back."""
    from eval.context import EvalSettings, load_model
    from models.convert import hf_clip, hf_vit

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    clip = perturbed(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)))
    vit = perturbed(transformers.ViTModel(transformers.ViTConfig(**VISION), add_pooling_layer=False))
    out = {}
    for name, model, convert in (("clip", clip, hf_clip), ("vit", vit, hf_vit)):
        model.save_pretrained(root / f"hf_{name}")
        assert convert.main([str(root / f"hf_{name}"), "--out", str(root / name)]) == 0
        settings = EvalSettings(checkpoint=str(root / name), data="", out="")
        out[name] = (model, load_model(str(root / name), settings))
    return root, out


@pytest.mark.parametrize("name, token", [("clip", "pre_final_norm"), ("vit", "final_norm")])
def test_authors_feature_is_hf_last_hidden_state_cls(hf_exports, name, token):
    """Their extractor reads `last_hidden_state[:, 0]`: before the final LayerNorm in CLIPVisionModel, after it in
    ViTModel. Our default feature is the normed CLS (pooler_output for CLIP), which differs for CLIP."""
    _, models = hf_exports
    hf, loaded = models[name]
    extract = authors_extract(loaded.extract, loaded.config["vision"])
    assert (extract.cls_token, extract.interpolation, extract.resize_backend) == (token, "bilinear", "pil")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = hf(pixel_values=images)
    ours, _ = encode_images(loaded.module, loaded.kind, images, extract.cls_token)
    assert (ours - out.last_hidden_state[:, 0]).abs().max().item() < 1e-5
    default, _ = encode_images(loaded.module, loaded.kind, images)
    if name == "clip":
        assert (default - out.pooler_output).abs().max().item() < 1e-5
        assert (default - out.last_hidden_state[:, 0]).abs().max().item() > 1e-2


def test_protocol_transforms_match_torchvision_on_pil():
    """authors: Resize(224) (bilinear) + CenterCrop(224); dino: Resize(256, interpolation=3) + CenterCrop(224);
    both ToTensor + ImageNet Normalize on the PIL image, as the references run them."""
    from torchvision import transforms

    from data.loader import pil_to_uint8

    rng = np.random.default_rng(0)
    pil = Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8))
    base = ExtractSettings(224)
    norm = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    theirs = transforms.Compose([transforms.Resize(224), transforms.CenterCrop(224), *norm])
    dino = transforms.Compose([transforms.Resize(256, interpolation=3), transforms.CenterCrop(224), *norm])
    authors = authors_extract(base, {"pre_norm": True})
    dino_settings = preset_extract(base, knn_preset("dino"))
    assert dino_settings.resize == 256 and dino_settings.cls_token == "final_norm"
    for settings, reference in ((authors, theirs), (dino_settings, dino)):
        ours = settings.transform()(pil_to_uint8(pil))
        assert ours.shape == (3, 224, 224) and torch.allclose(ours, reference(pil), atol=1e-6)
    assert not torch.allclose(base.transform()(pil_to_uint8(pil)), theirs(pil), atol=1e-3)  # the default: bicubic


# ----------------------------------------------------------------------------- kNN preset
def dino_knn_classifier(train_features, train_labels, test_features, test_labels, k, T, num_classes=1000):
    """facebookresearch/dino eval_knn.py: knn_classifier (features already L2-normalised)."""
    top1, top5, total = 0.0, 0.0, 0
    train_features = train_features.t()
    num_test_images, num_chunks = test_labels.shape[0], 100
    imgs_per_chunk = num_test_images // num_chunks
    retrieval_one_hot = torch.zeros(k, num_classes).to(train_features.device)
    for idx in range(0, num_test_images, imgs_per_chunk):
        features = test_features[idx: min((idx + imgs_per_chunk), num_test_images), :]
        targets = test_labels[idx: min((idx + imgs_per_chunk), num_test_images)]
        batch_size = targets.shape[0]
        similarity = torch.mm(features, train_features)
        distances, indices = similarity.topk(k, largest=True, sorted=True)
        candidates = train_labels.view(1, -1).expand(batch_size, -1)
        retrieved_neighbors = torch.gather(candidates, 1, indices)
        retrieval_one_hot.resize_(batch_size * k, num_classes).zero_()
        retrieval_one_hot.scatter_(1, retrieved_neighbors.view(-1, 1), 1)
        distances_transform = distances.clone().div_(T).exp_()
        probs = torch.sum(torch.mul(retrieval_one_hot.view(batch_size, -1, num_classes),
                                    distances_transform.view(batch_size, -1, 1)), 1)
        _, predictions = probs.sort(1, True)
        correct = predictions.eq(targets.data.view(-1, 1))
        top1 = top1 + correct.narrow(1, 0, 1).sum().item()
        top5 = top5 + correct.narrow(1, 0, min(5, k)).sum().item()
        total += targets.size(0)
    return top1 * 100.0 / total, top5 * 100.0 / total


def test_knn_dino_preset_settings():
    p = knn_preset("dino")
    assert (p.ks, p.temperature, p.headline_k) == ((10, 20, 100, 200), 0.07, 20)
    assert (p.interpolation, p.resize_backend) == ("bicubic", "pil") and p.resize_ratio == 256 / 224
    assert KNN_PRESETS["default"].ks == (20,) and preset_extract(ExtractSettings(224), KNN_PRESETS["default"]) is None
    assert knn_preset("dino", k=50).ks == (50,) and knn_preset("dino", k=50).headline_k == 50
    assert preset_extract(ExtractSettings(32), p).resize == 37  # DINO's ratio at another crop size
    with pytest.raises(ValueError, match="unknown kNN preset"):
        knn_preset("dinov2")


def test_knn_vote_by_hand_and_against_dino():
    """Neighbours at similarity 0.9 (class 0), 0.85 and 0.8 (class 1): with k = 3 the exp(sim / 0.07) weights
    give class 0 (e^12.86 > e^12.14 + e^11.43); at T = 1 the two class-1 votes win (e^0.85 + e^0.8 > e^0.9);
    with k = 1 class 0."""
    def unit(cos: float) -> list[float]:
        return [cos, (1 - cos ** 2) ** 0.5]

    train = torch.tensor([unit(0.9), unit(0.85), unit(0.8), unit(-0.9)])
    labels = torch.tensor([0, 1, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    assert knn_accuracies(train, labels, query, torch.tensor([0]), 2, [1, 3], 0.07) == {
        1: {"top1": 100.0, "top5": None}, 3: {"top1": 100.0, "top5": None}}
    assert knn_accuracies(train, labels, query, torch.tensor([1]), 2, [3], 1.0)[3]["top1"] == 100.0
    assert knn_accuracies(train, labels, query, torch.tensor([1]), 2, [1], 1.0)[1]["top1"] == 0.0

    (xtr, ytr), (xte, yte) = clustered(600, 12, 16, 0, spread=3.0), clustered(200, 12, 16, 1, spread=3.0)
    ours = knn_classify(xtr, ytr, xte, yte, 12, KNN_PRESETS["dino"].ks, 0.07, headline_k=20)
    assert ours["k"] == 20 and set(ours["by_k"]) == {"10", "20", "100", "200"}
    ntr, nte = nn.functional.normalize(xtr, dim=1, p=2), nn.functional.normalize(xte, dim=1, p=2)
    for k in (10, 20, 100, 200):
        top1, top5 = dino_knn_classifier(ntr, ytr, nte, yte, k, 0.07, num_classes=12)
        assert (ours["by_k"][str(k)]["top1"], ours["by_k"][str(k)]["top5"]) == pytest.approx((top1, top5))
    assert ours["top1"] == ours["by_k"]["20"]["top1"] and 20 < ours["top1"] < 100  # neither trivial nor chance


# ----------------------------------------------------------------------------- end to end
def write_shards(folder: Path, split: str, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    colours = np.array([[200, 40, 40], [40, 180, 60], [40, 60, 210]])
    with tarfile.open(folder / f"{split}-000000.tar", "w") as tar:
        for i in range(n):
            jpg = io.BytesIO()
            Image.fromarray(np.clip(colours[i % 3] + rng.normal(0, 30, (40, 48, 3)), 0, 255).astype(np.uint8)
                            ).save(jpg, format="JPEG", quality=95)
            for ext, payload in (("jpg", jpg.getvalue()), ("cls", str(i % 3).encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_cli_authors_protocol_and_dino_knn_on_converted_hf_clip(hf_exports, tmp_path, capsys):
    import importlib.util

    root, _ = hf_exports
    data = tmp_path / "shards"
    data.mkdir()
    write_shards(data, "train", 60, 0)
    write_shards(data, "val", 18, 1)
    (data / "classes.json").write_text(json.dumps(["red", "green", "blue"]))
    if str(REPO / "launch") not in sys.path:
        sys.path.append(str(REPO / "launch"))
    spec = importlib.util.spec_from_file_location("launch_eval_protocols", REPO / "launch" / "eval.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    common = ["--checkpoint", str(root / "clip"), "--data", str(data), "--tasks", "linear_probe,knn",
              "--workers", "0", "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    fast = ["--probe-epochs", "4", "--probe-grid-epochs", "2", "--probe-batch-size", "16"]
    rc = cli.main([*common, "--out", str(tmp_path / "out"), "--protocol", "authors", "--knn-preset", "dino", *fast])
    err = capsys.readouterr().err
    assert rc == 0, err
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    probe, knn = r["tasks"]["linear_probe"], r["tasks"]["knn"]
    assert probe["protocol"] == "authors" and probe["config"]["select_on"] == "val"
    assert probe["config"]["batch_size"] == 16 and probe["steps_per_epoch"] == 4  # 60 / 16, last batch kept
    assert probe["extract"]["cls_token"] == "pre_final_norm" and probe["extract"]["interpolation"] == "bilinear"
    assert knn["preset"] == "dino" and knn["extract"]["resize"] == 37 and knn["k"] == 20
    assert set(knn["by_k"]) == {"10", "20", "60"}  # 100 and 200 capped at the 60 train samples
    assert {"knn/top1", "knn/top1_k10", "knn/top1_k60", "linear_probe/top1"} <= set(r["summary"])
    timed = sorted(k.split("/", 1)[1] for k in r["timing"]["features"])  # each protocol extracts its own features
    assert timed == ["train[authors]", "train[dino_knn]", "val[authors]", "val[dino_knn]"]

    rc = cli.main([*common, "--out", str(tmp_path / "bad"), "--protocol", "authors", "--select-on", "heldout"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --protocol authors chooses") and err.count("\n") == 1
