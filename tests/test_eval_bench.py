"""python -m eval.bench runs end to end (slow: times a real probe; CI skips it)."""
import json

import pytest

from eval.bench import main


@pytest.mark.slow
def test_bench_tiny(tiny_world, tmp_path):
    assert main(["--models", "tiny", "--data", str(tiny_world), "--repeats", "1", "--workers", "0",
                 "--out", str(tmp_path / "bench")]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    tiny = result["models"]["tiny"]
    assert tiny["forward"]["images_per_s"] > 0 and tiny["pipeline"]["images"] == 32
    assert tiny["probe_paper_step"]["grid_points"] == 12 and "load_after" in result
    assert (tmp_path / "bench.txt").read_text().count("| tiny") == 1


def test_unknown_model_is_one_line(tmp_path, capsys):
    assert main(["--models", "tiny,huge", "--data", str(tmp_path)]) == 2
    assert "unknown --models huge" in capsys.readouterr().err
