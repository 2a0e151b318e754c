"""Image datasets as users have them on disk, each on a tiny fake in its real format: an image
folder (train/val), Stanford Cars (devkit .mat annotations) and FGVC-Aircraft (images_* lists);
missing files are one line naming the file expected."""

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dcal.train.build import build_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_image(path, seed, size=(23, 17)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def spec(name, root, **kw):
    return {"name": name, "root": str(root), "resize": 20, "crop": 16, **kw}


def check_sample(ds, n, classes):
    assert len(ds) == n and ds.num_classes == classes
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= y < classes


# ----------------------------------------------------------------------------- folder


def make_folder(root):
    for split, per in (("train", 3), ("val", 2)):
        for c in ("ant", "bee", "cat"):
            if split == "val" and c == "bee":
                continue  # a validation set without one class keeps the training labels
            for i in range(per):
                write_image(os.path.join(root, split, c, f"{i}.jpg"), hash((split, c, i)) % 1000)
    return root


@pytest.mark.parametrize("name", ["folder", "imagefolder"])
def test_folder(tmp_path, name):
    make_folder(tmp_path)
    train, val, facts = build_data(spec(name, tmp_path), seed=0)
    check_sample(train, 9, 3)
    assert val.num_classes == 3 and len(val) == 4 and facts["num_classes"] == 3
    assert train.classes == ["ant", "bee", "cat"]
    assert sorted({y for _, y in val.samples}) == [0, 2]  # cat keeps label 2 although bee is absent


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match=r"val"):
        os.makedirs(tmp_path / "train" / "a")
        write_image(str(tmp_path / "train" / "a" / "0.png"), 0)
        build_data(spec("folder", tmp_path), seed=0)
    os.makedirs(tmp_path / "val" / "zebra")
    write_image(str(tmp_path / "val" / "zebra" / "0.png"), 1)
    with pytest.raises(ValueError, match="not in the training folder"):
        build_data(spec("folder", tmp_path), seed=0)
    os.makedirs(tmp_path / "empty" / "train" / "a")
    with pytest.raises(ValueError, match="holds no images"):
        build_data(spec("folder", tmp_path / "empty"), seed=0)


# ----------------------------------------------------------------------------- Stanford Cars


def make_cars(root, test_in_devkit=False):
    from scipy.io import savemat

    names = np.array(["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "BMW M3 Coupe 2012"], dtype=object)
    os.makedirs(os.path.join(root, "devkit"), exist_ok=True)
    savemat(os.path.join(root, "devkit", "cars_meta.mat"), {"class_names": names.reshape(1, -1)})
    dt = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
    for split, labels in (("train", [1, 3, 2, 3]), ("test", [2, 1])):
        recs = np.zeros((1, len(labels)), dtype=dt)
        for i, c in enumerate(labels):
            fname = f"{i + 1:05d}.jpg"
            recs[0, i] = (np.uint8(1), np.uint8(2), np.uint8(20), np.uint8(15), np.uint8(c), fname)
            write_image(os.path.join(root, f"cars_{split}", fname), 10 * i + c)
        if split == "train":
            path = os.path.join(root, "devkit", "cars_train_annos.mat")
        else:
            path = os.path.join(root, "devkit" if test_in_devkit else "", "cars_test_annos_withlabels.mat")
        savemat(path, {"annotations": recs})
    return root


@pytest.mark.parametrize("test_in_devkit", [False, True])
def test_stanford_cars(tmp_path, test_in_devkit):
    pytest.importorskip("scipy")
    make_cars(str(tmp_path), test_in_devkit)
    train, val, facts = build_data(spec("cars", tmp_path), seed=0)
    check_sample(train, 4, 3)
    assert facts["num_classes"] == 3 and val.num_classes == 3
    assert [y for _, y in train.samples] == [0, 2, 1, 2] and [y for _, y in val.samples] == [1, 0]
    assert train.classes[1] == "Acura RL Sedan 2012"
    assert val.samples[0][0].endswith(os.path.join("cars_test", "00001.jpg"))


@pytest.mark.parametrize(
    "missing",
    ["devkit/cars_meta.mat", "devkit/cars_train_annos.mat", "cars_test_annos_withlabels.mat", "cars_train/00002.jpg"],
)
def test_stanford_cars_missing_file(tmp_path, missing):
    pytest.importorskip("scipy")
    make_cars(str(tmp_path))
    os.remove(tmp_path / missing)
    with pytest.raises(ValueError, match="expected the Stanford Cars .*" + os.path.basename(missing)):
        build_data(spec("cars", tmp_path), seed=0)


def test_stanford_cars_without_scipy(tmp_path, monkeypatch):
    pytest.importorskip("scipy")
    make_cars(str(tmp_path))
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # import scipy.io fails
    with pytest.raises(ValueError, match="needs scipy: pip install scipy"):
        build_data(spec("cars", tmp_path), seed=0)


# ----------------------------------------------------------------------------- FGVC-Aircraft


def make_aircraft(root):
    data = os.path.join(root, "data")
    variants = ["707-320", "A300B4", "Cessna 172", "F/A-18"]
    os.makedirs(data, exist_ok=True)
    with open(os.path.join(data, "variants.txt"), "w") as f:
        f.write("\n".join(variants) + "\n")
    lists = {
        "train": [("1025794", "Cessna 172"), ("1340192", "707-320"), ("0056978", "F/A-18")],
        "val": [("2213948", "A300B4")],
        "test": [("0062764", "F/A-18"), ("1109413", "Cessna 172")],
    }
    lists["trainval"] = lists["train"] + lists["val"]
    for split, rows in lists.items():
        with open(os.path.join(data, f"images_variant_{split}.txt"), "w") as f:
            for image_id, v in rows:
                f.write(f"{image_id} {v}\n")
                write_image(os.path.join(data, "images", image_id + ".jpg"), int(image_id) % 997)
    return root


def test_fgvc_aircraft(tmp_path):
    make_aircraft(str(tmp_path))
    train, val, facts = build_data(spec("aircraft", tmp_path), seed=0)
    check_sample(train, 4, 4)
    assert facts["num_classes"] == 4 and len(val) == 2
    assert [y for _, y in train.samples] == [2, 0, 3, 1] and [y for _, y in val.samples] == [3, 2]
    train, val, _ = build_data(spec("aircraft", tmp_path / "data", train_split="train", val_split="val"), seed=0)
    assert len(train) == 3 and len(val) == 1
    with pytest.raises(ValueError, match="data.val_split"):
        build_data(spec("aircraft", tmp_path, val_split="testing"), seed=0)


@pytest.mark.parametrize("missing", ["data/variants.txt", "data/images_variant_test.txt", "data/images/1340192.jpg"])
def test_fgvc_aircraft_missing_file(tmp_path, missing):
    make_aircraft(str(tmp_path))
    os.remove(tmp_path / missing)
    with pytest.raises(ValueError, match="expected the FGVC-Aircraft .*" + os.path.basename(missing)):
        build_data(spec("aircraft", tmp_path), seed=0)


def test_fgvc_aircraft_bad_line(tmp_path):
    make_aircraft(str(tmp_path))
    with open(tmp_path / "data" / "images_variant_test.txt", "a") as f:
        f.write("0000001 Concorde\n")
    with pytest.raises(ValueError, match="line 3"):
        build_data(spec("aircraft", tmp_path), seed=0)


# ----------------------------------------------------------------------------- CLI


def test_cli_missing_file_is_one_line(tmp_path, capsys):
    from dcal.train.__main__ import main

    make_aircraft(str(tmp_path / "air"))
    os.remove(tmp_path / "air" / "data" / "images_variant_trainval.txt")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {{name: mlp, hidden: 8}}\ndata: {{name: aircraft, root: {tmp_path / 'air'}, resize: 20, "
        "crop: 16}\ntrain: {epochs: 1, effective_batch: 2, micro_batch: 2, progress: false}\n"
    )
    assert main(["--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "images_variant_trainval.txt" in err[0] and err[0].startswith("error:")
    assert not (tmp_path / "o").exists()


def test_cli_trains_on_a_folder(tmp_path):
    from dcal.train.__main__ import main

    make_folder(str(tmp_path / "imgs"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {{name: mlp, hidden: 8}}\ndata: {{name: folder, root: {tmp_path / 'imgs'}, resize: 20, "
        "crop: 16}\ntrain: {epochs: 1, effective_batch: 3, micro_batch: 3, progress: false, threads: 1}\n"
    )
    n = torch.get_num_threads()
    try:
        assert main(["--config", str(cfg), "--out", str(tmp_path / "o")]) == 0
    finally:
        torch.set_num_threads(n)
    assert (tmp_path / "o" / "metrics.jsonl").exists()
