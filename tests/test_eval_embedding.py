"""Embedding-analysis statistics, synthetic-world factors and prompts, disagreement pairs: known answers."""
import random

import pytest
import torch
import torch.nn.functional as F

from data import synthetic as syn
from eval.disagreement import Thresholds, find_disagreements
from eval.embedding import (analyse, class_similarity_matrix, controlled_sensitivity, intra_inter,
                            natural_factor_similarity, random_pair_similarity)
from eval.factors import CLASSES, FACTOR_NAMES, controlled_pairs, factor_label, factor_labels, zero_shot_prompts


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def brute_pairs(z: torch.Tensor, keep) -> float:
    vals = [float(z[i] @ z[j]) for i in range(len(z)) for j in range(len(z)) if i != j and keep(i, j)]
    return sum(vals) / len(vals)


def test_pair_statistics_match_brute_force():
    z, labels = unit(30, 8, 0), torch.arange(30) % 4
    assert random_pair_similarity(z) == pytest.approx(brute_pairs(z, lambda i, j: True), abs=1e-5)
    stats = intra_inter(z, labels)
    assert stats["intra"] == pytest.approx(brute_pairs(z, lambda i, j: labels[i] == labels[j]), abs=1e-5)
    assert stats["inter"] == pytest.approx(brute_pairs(z, lambda i, j: labels[i] != labels[j]), abs=1e-5)
    matrix = class_similarity_matrix(z, labels, 5)  # class 4 has no samples
    assert matrix[1, 2] == pytest.approx(brute_pairs(z, lambda i, j: labels[i] == 1 and labels[j] == 2), abs=1e-5)
    assert matrix[3, 3] == pytest.approx(brute_pairs(z, lambda i, j: labels[i] == labels[j] == 3), abs=1e-5)
    assert torch.isnan(matrix[4]).all()


def test_features_that_encode_one_factor():
    """Features = a direction per value of factor 0 (+ small noise): only factor 0 separates pairs."""
    g = torch.Generator().manual_seed(0)
    factors = torch.stack([torch.arange(60) % 3, torch.randint(0, 4, (60,), generator=g)], dim=1)  # (N, 2)
    z = F.normalize(unit(3, 16, 1)[factors[:, 0]] + 0.05 * torch.randn(60, 16, generator=g), dim=-1)
    natural = natural_factor_similarity(z, factors, ["semantic", "nuisance"])
    assert natural["semantic"]["gap"] > 0.5 and abs(natural["nuisance"]["gap"]) < 0.1
    full = analyse(z, factors[:, 0], 3, factors, ["semantic", "nuisance"])
    assert full["label"]["gap_normalized"] > 0.5 and full["class_similarity"].shape == (3, 3)
    # controlled pairs: changing factor 0 moves the feature, changing factor 1 does not
    base = z[:20]
    varied_semantic = F.normalize(unit(3, 16, 1)[(factors[:20, 0] + 1) % 3], dim=-1)
    out = controlled_sensitivity(torch.cat([base, base]), torch.cat([varied_semantic, base]),
                                 ["semantic"] * 20 + ["nuisance"] * 20, random_pair_similarity(z))
    assert out["semantic"]["sensitivity"] > 0.8 and out["nuisance"]["sensitivity"] == pytest.approx(0, abs=1e-5)
    assert out["nuisance"]["similarity"] == pytest.approx(1.0) and out["semantic"]["pairs"] == 20


def test_factor_labels_and_prompts():
    rng = random.Random(0)
    for _ in range(50):
        f = syn.sample_factors(rng)
        labels = factor_labels(f)
        assert len(labels) == len(FACTOR_NAMES)
        assert all(0 <= v < len(CLASSES[n]) for v, n in zip(labels, FACTOR_NAMES))
        assert CLASSES["shape"][factor_label(f, "shape")] == f["shape"]
        assert CLASSES["word"][factor_label(f, "word")] == (f["word"] or "none")
    assert factor_label({"position": [0.1, 0.95]}, "position") == CLASSES["position"].index("bottom-left")
    assert factor_label({"rotation": 359.9}, "rotation") == 7
    shape = zero_shot_prompts("shape")
    assert list(shape) == list(syn.SHAPES) and "photo of an oval" in shape["oval"] and "a star" in shape["star"]
    word = zero_shot_prompts("word")
    assert "none" not in word and any('"pizza"' in p for p in word["pizza"])
    assert 'a red circle' in zero_shot_prompts("color")["red"]
    assert zero_shot_prompts("size") is None and zero_shot_prompts("rotation") is None


def test_controlled_pairs_change_exactly_one_factor():
    rng = random.Random(1)
    records = [syn.sample_factors(rng) for _ in range(10)]
    pairs = controlled_pairs(records, FACTOR_NAMES, 4, seed=0)
    assert len(pairs) == 4 * len(FACTOR_NAMES)
    for factor, base, varied in pairs:
        changed = {n for n, a, b in zip(FACTOR_NAMES, factor_labels(base), factor_labels(varied)) if a != b}
        if factor in ("shape", "word", "count", "color", "style", "size"):
            assert changed == {factor}
        else:  # position / rotation change the raw value; the coarse bin may stay
            assert changed <= {factor} and base[factor] != varied[factor]
        assert base["render_seed"] == varied["render_seed"]
    assert controlled_pairs(records, ("shape",), 3, seed=0) == controlled_pairs(records, ("shape",), 3, seed=0)


def test_disagreement_pairs_follow_what_each_model_tracks():
    """Model A groups images by factor 0, model B by factor 1: A-high/B-low pairs share factor 0 only."""
    n = 40
    factors = torch.stack([torch.arange(n) % 4, (torch.arange(n) // 4) % 5], dim=1)
    g = torch.Generator().manual_seed(0)
    za = F.normalize(unit(4, 32, 1)[factors[:, 0]] + 0.1 * torch.randn(n, 32, generator=g), dim=-1)
    zb = F.normalize(unit(5, 32, 2)[factors[:, 1]] + 0.1 * torch.randn(n, 32, generator=g), dim=-1)
    report = find_disagreements(za, zb, Thresholds(), top=5, factors=factors, factor_names=["f0", "f1"])
    a, b = report["a_high_b_low"], report["b_high_a_low"]
    assert a["count"] > 0 and b["count"] > 0 and a["selection"] == b["selection"] == "threshold"
    assert a["factor_agreement"] == {"f0": 1.0, "f1": 0.0} and b["factor_agreement"] == {"f0": 0.0, "f1": 1.0}
    assert report["factor_agreement_all_pairs"]["f0"] < 0.3
    used = [k for i, j, _, _ in a["pairs"] for k in (i, j)]
    assert len(used) == len(set(used)) and len(a["pairs"]) == 5  # each image at most once in the listed pairs
    assert all(sa > 0.7 and sb < 0.5 for _, _, sa, sb in a["pairs"])
    # nothing past the absolute thresholds: the relative fallback still names the most disagreeing pairs
    strict = find_disagreements(za, zb, Thresholds(1.1, -1.1, 1.1, -1.1), top=3)
    assert strict["a_high_b_low"]["count"] == 0 and strict["a_high_b_low"]["selection"] == "relative"
    assert len(strict["a_high_b_low"]["pairs"]) == 3
    assert Thresholds.parse("0.7,0.5,0.8,0.5") == Thresholds()
    with pytest.raises(ValueError, match="4 comma-separated"):
        Thresholds.parse("0.7,0.5")


def test_analyse_matches_the_standalone_statistics():
    """analyse shares one similarity matrix between its statistics: same numbers as each function alone."""
    g = torch.Generator().manual_seed(3)
    z, labels, factors = unit(50, 8, 3), torch.arange(50) % 5, torch.randint(0, 3, (50, 2), generator=g)
    full = analyse(z, labels, 5, factors, ["a", "b"])
    alone = intra_inter(z, labels)
    assert all(full["label"][k] == pytest.approx(alone[k], abs=1e-6) for k in alone)
    natural = natural_factor_similarity(z, factors, ["a", "b"])
    assert all(full["natural"][f][k] == pytest.approx(natural[f][k], abs=1e-6) for f in natural for k in natural[f])


def test_disagreement_similarities_are_the_pair_cosines():
    za, zb = unit(12, 8, 4), unit(12, 6, 5)
    report = find_disagreements(za, zb, Thresholds(-2, 2, -2, 2), top=3)  # every pair passes both thresholds
    assert report["pairs_total"] == 12 * 11 // 2
    for i, j, sa, sb in report["a_high_b_low"]["pairs"] + report["b_high_a_low"]["pairs"]:
        assert i < j and sa == pytest.approx(float(za[i] @ za[j]), abs=1e-6)
        assert sb == pytest.approx(float(zb[i] @ zb[j]), abs=1e-6)
