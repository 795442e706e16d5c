"""Data that is already there: the generators refuse to replace a dataset root unless --force,
a re-conversion replaces a .beton only once the new one is complete (a failed one leaves the
old file byte for byte and inode for inode, so a job's mmap of it stays valid), the Fashion-MNIST
converter refuses a negative --limit and out-of-range labels, and a registry num_classes that
disagrees with the converter's manifest is refused at submission."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep import fashion_mnist, scenes, synthetic
from data_prep.manifest import Refused
from hpc_mim.tempfiles import is_stale, remove_stale

SOURCE = Path(fashion_mnist.DEFAULT_SOURCE)
TINY = ["--classes", "1", "--train", "1", "--val", "1", "--scenes", "1"]


def test_synthetic_refuses_to_replace_dataset_roots_unless_forced(tmp_path, capsys):
    out = tmp_path / "data"
    real_coco = tmp_path / "elsewhere" / "coco"          # data/coco as a link to the real COCO
    (real_coco / "annotations").mkdir(parents=True)
    (real_coco / "annotations" / "instances_val2017.json").write_text('{"real": true}')
    (out / "ADEChallengeData2016" / "images").mkdir(parents=True)
    (out / "ADEChallengeData2016" / "images" / "real.jpg").write_bytes(b"real ADE20K")
    (out / "scenes").mkdir()
    (out / "scenes" / "mine.txt").write_text("someone's scenes")
    os.symlink(real_coco, out / "coco")

    assert synthetic.main(["--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert str(out / "ADEChallengeData2016") in err and str(out / "coco") in err and "--force" in err
    assert (out / "ADEChallengeData2016" / "images" / "real.jpg").read_bytes() == b"real ADE20K"
    assert (out / "coco").is_symlink() and not (out / "imagenet_tree").exists()
    assert sorted(p.name for p in out.iterdir()) == ["ADEChallengeData2016", "coco", "scenes"]

    assert synthetic.main(["--out", str(out), *TINY, "--force"]) == 0
    assert not (out / "ADEChallengeData2016" / "images" / "real.jpg").exists()
    assert len(list((out / "ADEChallengeData2016" / "images" / "training").glob("*.jpg"))) == 1
    assert not (out / "coco").is_symlink() and (out / "coco" / "annotations" / "instances_val2017.json").is_file()
    # the link was replaced, not followed: the real COCO is untouched; <out>/scenes is not ours
    assert json.loads((real_coco / "annotations" / "instances_val2017.json").read_text()) == {"real": True}
    assert (out / "scenes" / "mine.txt").read_text() == "someone's scenes"
    assert sorted(p.name for p in out.iterdir()) == ["ADEChallengeData2016", "coco", "imagenet_tree", "scenes"]


def test_scenes_refuse_existing_output_and_force_replaces_it_whole(tmp_path, capsys):
    scenes.generate(SOURCE, tmp_path, train=3, val=1)
    before = (tmp_path / "coco" / "annotations" / "instances_train2017.json").read_bytes()
    with pytest.raises(Refused, match="coco"):
        scenes.generate(SOURCE, tmp_path, train=2, val=1, seed=1)
    assert scenes.main(["--out", str(tmp_path), "--train", "2", "--val", "1"]) == 2
    assert str(tmp_path / "ade20k") in capsys.readouterr().err
    assert (tmp_path / "coco" / "annotations" / "instances_train2017.json").read_bytes() == before
    scenes.generate(SOURCE, tmp_path, train=2, val=1, seed=1, force=True)
    # no scene of the larger earlier run lingers next to the new ones
    assert len(list((tmp_path / "ade20k" / "images" / "training").glob("*.jpg"))) == 2
    assert len(list((tmp_path / "coco" / "train2017").glob("*.jpg"))) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ade20k", "coco"]     # no staging left


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_ino) for p in sorted(folder.iterdir())}


def test_a_failed_reconversion_leaves_the_old_beton_and_manifest_untouched(tmp_path, monkeypatch):
    out = tmp_path / "fm"
    fashion_mnist.convert(SOURCE, out, limit=40)
    before = snapshot(out)
    real = fashion_mnist.GrayAsRGB.__getitem__

    def bad_record(self, i):                   # the writer's workers are forked: they see it
        if i >= 20:
            raise OSError(f"injected: sample {i} unreadable")
        return real(self, i)
    monkeypatch.setattr(fashion_mnist.GrayAsRGB, "__getitem__", bad_record)
    with pytest.raises(Exception, match="injected: sample 2"):
        fashion_mnist.convert(SOURCE, out, limit=40)
    assert snapshot(out) == before             # same bytes, same inodes: a reader's mmap holds
    assert sorted(p.name for p in out.iterdir()) == ["train.beton", "train.json", "val.beton", "val.json"]


def test_a_successful_reconversion_replaces_the_file_under_an_open_reader(tmp_path):
    out = tmp_path / "fm"
    fashion_mnist.convert(SOURCE, out, limit=40)
    old = (out / "val.beton").read_bytes()
    old_inode = (out / "val.beton").stat().st_ino
    with open(out / "val.beton", "rb") as reader:      # a job reading it meanwhile
        fashion_mnist.convert(SOURCE, out, limit=24)
        assert reader.read() == old                      # not truncated under it
    assert (out / "val.beton").stat().st_ino != old_inode
    manifest = json.loads((out / "val.json").read_text())
    st = (out / "val.beton").stat()
    assert manifest["num_samples"] == 24 and manifest["bytes"] == st.st_size
    assert manifest["mtime_ns"] == st.st_mtime_ns
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_stale_temporaries_are_those_of_dead_writers(tmp_path):
    import socket
    import time
    host = socket.gethostname()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    names = {f".train.beton.tmp-{host}-{gone}": True,              # its writer died here
             f".train.beton.tmp-{host}-{os.getpid()}": False,      # ours
             f".val.beton.tmp-{host}-{os.getppid()}": False,       # a live writer here
             ".a.pt.tmp-othernode-7": True,                        # another node's, old and idle
             ".b.pt.tmp-othernode-8": False,                       # another node's, being written
             ".c.pt.tmp99": True,                                  # the older name, old and idle
             "train.beton": False}
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    hour_ago = time.time() - 3600
    for name in (".a.pt.tmp-othernode-7", ".c.pt.tmp99", f".val.beton.tmp-{host}-{os.getppid()}"):
        os.utime(tmp_path / name, (hour_ago, hour_ago))
    assert {n: is_stale(tmp_path / n) for n in names} == names
    assert sorted(p.name for p in remove_stale(tmp_path)) == sorted(n for n, s in names.items() if s)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, s in names.items() if not s)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_refuses_a_negative_limit_and_labels_out_of_range(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        fashion_mnist.main(["--out", str(tmp_path / "o"), "--limit", "-5"])
    assert exit_.value.code == 2 and "--limit" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--limit"):
        fashion_mnist.convert(SOURCE, tmp_path / "o", limit=-5)
    src = tmp_path / "src"
    src.mkdir()
    for prefix, labels in (("train", [0, 9, 3]), ("t10k", [1, 12, 2])):
        write_idx(src / f"{prefix}-images-idx3-ubyte.gz", np.zeros((3, 28, 28)))
        write_idx(src / f"{prefix}-labels-idx1-ubyte.gz", np.array(labels))
    assert fashion_mnist.main(["--source", str(src), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert f"{src / 't10k-labels-idx1-ubyte.gz'}: label 12 (sample 1) is outside [0, 10)" in err
    assert not (tmp_path / "o").exists()                    # both splits checked before writing


def test_registry_num_classes_must_agree_with_the_manifest(tmp_path):
    from hpc_mim.config import load_config
    from hpc_mim.config_error import ConfigError
    from jobs.runs import check_inputs
    folder = tmp_path / "data" / "fmnist"
    folder.mkdir(parents=True)
    for split in ("train", "val"):
        (folder / f"{split}.beton").write_bytes(b"beton")
        (folder / f"{split}.json").write_text(json.dumps({"classes": [f"c{i}" for i in range(10)]}))
    cfg = load_config("mae", "smoke", overrides=[f"data.root={tmp_path / 'data'}", "evals=[knn]"])
    run_dir = tmp_path / "runs" / "x"
    check_inputs(cfg, run_dir)                                   # 10 and 10: fine
    (folder / "val.json").write_text(json.dumps({"classes": [f"c{i}" for i in range(12)]}))
    with pytest.raises(ConfigError) as e:
        check_inputs(cfg, run_dir)
    text = str(e.value)
    assert "fmnist" in text and str(folder / "val.json") in text and "num_classes: 10" in text
    assert "records 12 classes" in text
    assert not (tmp_path / "runs").exists()


def test_submit_names_the_num_classes_mismatch_and_creates_nothing(tmp_path, capsys):
    from jobs import submit
    folder = tmp_path / "data" / "fmnist"
    folder.mkdir(parents=True)
    for split, n in (("train", 10), ("val", 11)):
        (folder / f"{split}.beton").write_bytes(b"beton")
        (folder / f"{split}.json").write_text(json.dumps({"classes": [f"c{i}" for i in range(n)]}))
    code = submit.main(["--method", "mae", "--preset", "smoke", "--cluster", "local",
                        "--set", f"data.root={tmp_path / 'data'}", "--set", "evals=[knn]",
                        "--set", f"runs_root={tmp_path / 'runs'}", "--set", "name=x"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: data.dataset=fmnist:") and "records 11 classes" in err
    assert not (tmp_path / "runs").exists()


def test_a_manifest_that_does_not_describe_its_file_is_not_trusted(tmp_path):
    """A kill between the .beton's rename and the manifest's leaves a new file beside the old
    manifest: the dataset's identity is then the file's own sha256, not the recorded one."""
    from hpc_mim.datasets import file_sha256, manifest
    folder = tmp_path / "fmnist"
    folder.mkdir()
    info = {"kind": "classification", "train": str(folder / "train.beton"), "val": str(folder / "val.beton")}
    for split in ("train", "val"):
        beton = folder / f"{split}.beton"
        beton.write_bytes(b"old content")
        st = beton.stat()
        (folder / f"{split}.json").write_text(json.dumps(
            {"sha256": "recorded", "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}))
    assert manifest(info) == {"train.beton": "recorded", "val.beton": "recorded"}
    (folder / "val.beton").write_bytes(b"new content")            # same size, new mtime
    os.utime(folder / "val.beton", ns=(st.st_mtime_ns + 5 * 10**9, st.st_mtime_ns + 5 * 10**9))
    assert manifest(info) == {"train.beton": "recorded", "val.beton": file_sha256(folder / "val.beton")}
