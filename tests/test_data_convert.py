"""python -m data.convert: ImageFolder -> labeled shards; DataComp (img2dataset) shards read as they are."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from data.convert import convert_imagefolder, main, prepare_datacomp
from data.loader import PretrainLoader, SampleProcessor
from data.shards import count_samples, expand_shards
from data.transforms import ClipTransform
from data.validate import unvalidated


def members(shard):
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def image_bytes(fmt, size=(20, 16), seed=0):
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8")).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def tree(tmp_path):
    """3 classes (one nested), jpg/png/bmp, a png named .JPEG (as in ImageNet), a broken file, a non-image file."""
    root = tmp_path / "tree"
    for c, name in enumerate(["cat", "dog", "zebra"]):
        (root / name / "sub").mkdir(parents=True)
        for i in range(4):
            (root / name / ("sub" if i == 3 else "") / f"img{i}.jpg").write_bytes(image_bytes("JPEG", seed=10 * c + i))
    (root / "cat" / "x.bmp").write_bytes(image_bytes("BMP", seed=99))
    (root / "dog" / "n0001.JPEG").write_bytes(image_bytes("PNG", seed=98))
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (root / "zebra" / "notes.txt").write_text("not an image")
    return root


def test_imagefolder_to_labeled_shards(tree, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["imagefolder", str(tree), "--out", str(out), "--shard-size", "5", "--workers", "2"]) == 0
    assert "14 of 15 images in 3 classes -> 3 shard(s)" in capsys.readouterr().out
    assert json.loads((out / "classes.json").read_text()) == ["cat", "dog", "zebra"]
    shards = expand_shards(str(out / "train-*.tar"))
    assert [s.rsplit("/", 1)[-1] for s in shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert json.loads((out / "sizes.json").read_text()) == {"train-000000.tar": 4, "train-000001.tar": 5,
                                                            "train-000002.tar": 5}  # broken.jpg skipped
    assert json.loads((out / "train_skipped.json").read_text())[0]["source_path"] == "dog/broken.jpg"
    samples = {}
    for shard in shards:
        for name, data in members(shard).items():
            key, ext = name.split(".", 1)
            samples.setdefault(key, {})[ext] = data
    labels = {}
    for key, parts in samples.items():
        meta = json.loads(parts["json"])
        assert int(parts["cls"]) == meta["label"] and meta["class_name"] == ["cat", "dog", "zebra"][meta["label"]]
        assert {"source_path", "width", "height"} <= set(meta) and key.startswith("train_")
        labels[meta["source_path"]] = (meta["label"], [e for e in parts if e not in ("cls", "json")][0], parts)
    assert labels["zebra/sub/img3.jpg"][:2] == (2, "jpg")
    assert labels["zebra/sub/img3.jpg"][2]["jpg"] == (tree / "zebra/sub/img3.jpg").read_bytes()  # bytes kept
    assert labels["dog/n0001.JPEG"][1] == "png" and labels["cat/x.bmp"][1] == "png"  # real format / re-encoded
    assert unvalidated(shards, ("image", "label", "json")) == []  # converted shards are ready for DALI


def test_val_split_reuses_the_class_index(tree, tmp_path):
    out = tmp_path / "shards"
    convert_imagefolder(str(tree), str(out), "train", shard_size=100)
    val = tmp_path / "val"
    (val / "zebra").mkdir(parents=True)
    (val / "zebra" / "v.jpg").write_bytes(image_bytes("JPEG"))
    summary = convert_imagefolder(str(val), str(out), "val", shuffle=False)
    assert summary["written"] == 1 and json.loads((out / "classes.json").read_text()) == ["cat", "dog", "zebra"]
    assert members(out / "val-000000.tar")["val_00000000.cls"] == b"2"  # zebra keeps index 2
    assert set(json.loads((out / "sizes.json").read_text())) == {"train-000000.tar", "val-000000.tar"}
    (val / "lion").mkdir()
    (val / "lion" / "l.jpg").write_bytes(image_bytes("JPEG"))
    with pytest.raises(Exception, match="not in .*classes.json"):
        convert_imagefolder(str(val), str(out), "val", overwrite=True)
    assert main(["imagefolder", str(val), "--out", str(out), "--split", "val"]) == 2  # exists: no overwrite


def img2dataset_folder(root, shards=2, per_shard=5):
    """What img2dataset writes for DataComp: NNNNN.tar (jpg/txt/json with uid + an extra component),
    NNNNN_stats.json and NNNNN.parquet beside."""
    root.mkdir()
    for s in range(shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                meta = {"uid": f"{s:04x}{i:028x}", "url": f"http://x/{key}.jpg", "caption": f"photo {key}",
                        "key": key, "status": "success", "width": 20, "height": 16}
                for ext, data in (("jpg", image_bytes("JPEG", seed=s * 100 + i)), ("txt", f"photo {key}".encode()),
                                  ("json", json.dumps(meta).encode()), ("l14.npy", b"\x93NUMPY extra component")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (root / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard + 2, "successes": per_shard,
                                                              "failed_to_download": 2}))
        (root / f"{s:05d}.parquet").write_bytes(b"PAR1 not read")
    return root


def test_datacomp_shards_are_read_as_img2dataset_writes_them(tmp_path, capsys):
    root = img2dataset_folder(tmp_path / "datacomp")
    assert main(["datacomp", str(root)]) == 0
    out = capsys.readouterr().out
    assert "2 shards, 10 samples" in out and "json with uid: 100%" in out and "l14.npy 100%" in out
    assert f"data.train='{root}/{{00000..00001}}.tar'" in out
    assert json.loads((root / "sizes.json").read_text()) == {"00000.tar": 5, "00001.tar": 5}
    shards = expand_shards(f"{root}/{{00000..00001}}.tar")
    assert count_samples(shards) == 10
    captions = []
    loader = PretrainLoader(shards, SampleProcessor(ClipTransform(16), text_encoder=lambda t: captions.extend(t)),
                            5, seed=0, workers=0, shuffle_buffer=1)
    it = iter(loader)
    keys = next(it).keys + next(it).keys
    assert sorted(keys) == [f"{s:05d}{i:04d}" for s in range(2) for i in range(5)] and loader.skipped == {}
    assert sorted(captions) == sorted(f"photo {k}" for k in keys)
    summary = prepare_datacomp(str(root))
    assert summary["uid"] == 1.0 and summary["components"]["jpg"] == 1.0


def test_datacomp_keys_match_between_backends(tmp_path):
    pytest.importorskip("nvidia.dali")
    from data.dali.index import ensure_indexes
    from data.dali.loader import DaliLoader

    root = img2dataset_folder(tmp_path / "datacomp")
    shards = expand_shards(str(root / "*.tar"))
    proc = SampleProcessor(ClipTransform(16), text_encoder=lambda texts: torch.zeros(len(texts), 1))
    dali = iter(DaliLoader(shards, ensure_indexes(shards), proc, 5, seed=0, threads=1))
    cpu = iter(PretrainLoader(shards, proc, 5, seed=0, workers=0))
    assert sorted(next(dali).keys + next(dali).keys) == sorted(next(cpu).keys + next(cpu).keys)
