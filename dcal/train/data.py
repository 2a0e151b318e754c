"""Datasets of the training loop: image folders (``root/train``, ``root/val``), CUB-200-2011,
Stanford Cars and FGVC-Aircraft in their own release formats, a synthetic
fine-grained image set made on the fly (the default: no download), and a synthetic BEV task.

Randomness of augmentation is a function of ``(seed, epoch, index)`` only (:func:`sample_rng`),
not of a global generator or of the DataLoader worker that loads the sample: the same sample gets
the same crop whatever ``num_workers`` is and whether or not the run was resumed, which is what
makes ``--resume`` and DDP runs reproduce a single-process run exactly.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def sample_rng(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator private to one sample of one epoch."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 7_919 + index) % (2**63 - 1))
    return g


class EpochDataset(Dataset):
    """A dataset whose augmentation depends on the epoch (set before each epoch's loader is made)."""

    epoch: int = 0
    seed: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


# ----------------------------------------------------------------------------- transforms


class ImageTransform:
    """The DCAL augmentation: resize to ``resize`` x ``resize``, then a random ``crop`` x ``crop``
    crop and a horizontal flip for training, the centre crop for evaluation; normalised with the
    ImageNet statistics. ``resize=550, crop=448`` is the paper's recipe.

    Works on a PIL image or a float [3, H, W] tensor in [0, 1]; returns a float [3, crop, crop].
    """

    def __init__(
        self,
        train: bool,
        resize: int = 550,
        crop: int = 448,
        flip: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        if crop > resize:
            raise ValueError(f"crop ({crop}) must not exceed resize ({resize})")
        self.train, self.resize, self.crop, self.flip = train, int(resize), int(crop), flip
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, img, g: torch.Generator) -> Tensor:
        if not isinstance(img, Tensor):
            from PIL import Image

            img = img.convert("RGB").resize((self.resize, self.resize), Image.BILINEAR)
            x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        else:
            x = img.float()
            if x.shape[-2:] != (self.resize, self.resize):
                x = torch.nn.functional.interpolate(
                    x[None], size=(self.resize, self.resize), mode="bilinear", align_corners=False, antialias=True
                )[0]
        slack = self.resize - self.crop
        if self.train:
            top = int(torch.randint(0, slack + 1, (1,), generator=g))
            left = int(torch.randint(0, slack + 1, (1,), generator=g))
        else:
            top = left = slack // 2
        x = x[:, top : top + self.crop, left : left + self.crop]
        if self.train and self.flip and bool(torch.rand((), generator=g) < 0.5):
            x = x.flip(-1)
        return ((x - self.mean) / self.std).contiguous()


# ----------------------------------------------------------------------------- image folders


class ImageList(EpochDataset):
    """Images on disk given as ``(path, label)`` pairs, loaded with PIL."""

    def __init__(self, samples: List[Tuple[str, int]], classes: List[str], transform: ImageTransform, seed: int = 0):
        if not samples:
            raise ValueError("the dataset holds no images")
        self.samples, self.classes, self.transform, self.seed = samples, classes, transform, seed

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as img:
            x = self.transform(img, sample_rng(self.seed, self.epoch, index))
        return x, label


def _read_table(path: str) -> List[List[str]]:
    if not os.path.isfile(path):
        raise ValueError(f"expected the CUB-200-2011 file {path}")
    with open(path) as f:
        return [line.split() for line in f if line.strip()]


def cub200(root: str, split: str, transform: ImageTransform, seed: int = 0) -> ImageList:
    """CUB-200-2011 from its own format: ``root`` holds ``images.txt`` (id, relative path),
    ``image_class_labels.txt`` (id, class 1..200), ``train_test_split.txt`` (id, 1 = train) and
    the ``images/`` folder; ``classes.txt`` names the classes when present."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not os.path.isdir(root):
        raise ValueError(f"data.root {root!r} is not a directory (expected the CUB_200_2011 folder)")
    paths = {r[0]: r[1] for r in _read_table(os.path.join(root, "images.txt"))}
    labels = {r[0]: int(r[1]) - 1 for r in _read_table(os.path.join(root, "image_class_labels.txt"))}
    is_train = {r[0]: r[1] == "1" for r in _read_table(os.path.join(root, "train_test_split.txt"))}
    names_file = os.path.join(root, "classes.txt")
    n_cls = max(labels.values()) + 1
    classes = [r[1] for r in _read_table(names_file)] if os.path.isfile(names_file) else [str(i) for i in range(n_cls)]
    want = split == "train"
    ids = sorted((i for i in paths if is_train.get(i) == want), key=int)
    samples = [(os.path.join(root, "images", paths[i]), labels[i]) for i in ids]
    return ImageList(samples, classes, transform, seed)


def image_folder(root: str, transform: ImageTransform, seed: int = 0, classes: Optional[List[str]] = None) -> ImageList:
    """torchvision's ImageFolder layout: ``root/<class>/<image>``, classes in sorted order.
    ``classes``: the class list of the training split (a validation folder lacking a class keeps
    the training labels; one holding an unknown class is refused)."""
    if not os.path.isdir(root):
        raise ValueError(f"expected the image folder {root} (one sub-folder of images per class)")
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not found:
        raise ValueError(f"image folder {root} has no class sub-folders (expected {root}/<class>/<image>)")
    if classes is not None:
        unknown = [c for c in found if c not in classes]
        if unknown:
            raise ValueError(f"image folder {root} holds classes not in the training folder: {unknown[:5]}")
    classes = list(classes) if classes is not None else found
    samples = []
    for c in found:
        label = classes.index(c)
        for dirpath, _, files in sorted(os.walk(os.path.join(root, c))):
            for fn in sorted(files):
                if fn.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(dirpath, fn), label))
    if not samples:
        raise ValueError(f"image folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return ImageList(samples, classes, transform, seed)


def folder_splits(
    root: str, train_transform: ImageTransform, val_transform: ImageTransform, seed: int = 0
) -> Tuple[ImageList, ImageList]:
    """``root/train/<class>/<image>`` and ``root/val/<class>/<image>``; the validation labels
    follow the training folder's classes."""
    if not os.path.isdir(root):
        raise ValueError(f"data.root {root!r} is not a directory (expected {root}/train and {root}/val)")
    train = image_folder(os.path.join(root, "train"), train_transform, seed)
    val = image_folder(os.path.join(root, "val"), val_transform, seed, classes=train.classes)
    return train, val


def _need_file(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise ValueError(f"expected the {what} file {path}")
    return path


def _loadmat(path: str):
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ValueError(
            f"reading {path} (Stanford Cars annotations, a .mat file) needs scipy: pip install scipy"
        ) from None
    try:
        return loadmat(path, squeeze_me=True)
    except Exception as e:  # a corrupt or non-MAT file
        raise ValueError(f"cannot read {path} as a MATLAB file: {e}") from None


def stanford_cars(root: str, split: str, transform: ImageTransform, seed: int = 0) -> ImageList:
    """Stanford Cars (196 classes) from its devkit: ``root/devkit/cars_meta.mat`` (class names),
    ``root/devkit/cars_train_annos.mat`` and ``root/cars_test_annos_withlabels.mat`` (also
    looked for in ``devkit/``): records with ``fname`` and ``class`` (1-based); images in
    ``root/cars_train/`` and ``root/cars_test/``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not os.path.isdir(root):
        raise ValueError(
            f"data.root {root!r} is not a directory (expected the Stanford Cars folder with devkit/, "
            "cars_train/, cars_test/)"
        )
    meta = _loadmat(_need_file(os.path.join(root, "devkit", "cars_meta.mat"), "Stanford Cars"))
    classes = [str(c) for c in np.atleast_1d(meta["class_names"]).tolist()]
    if split == "train":
        annos = os.path.join(root, "devkit", "cars_train_annos.mat")
    else:
        annos = os.path.join(root, "cars_test_annos_withlabels.mat")
        if not os.path.exists(annos) and os.path.exists(os.path.join(root, "devkit", os.path.basename(annos))):
            annos = os.path.join(root, "devkit", os.path.basename(annos))
    records = np.atleast_1d(_loadmat(_need_file(annos, "Stanford Cars"))["annotations"])
    folder = os.path.join(root, f"cars_{split}")
    if not os.path.isdir(folder):
        raise ValueError(f"expected the Stanford Cars image folder {folder}")
    samples = []
    for r in records:
        label = int(r["class"]) - 1
        if not 0 <= label < len(classes):
            raise ValueError(f"{annos}: class {int(r['class'])} of {r['fname']} is outside 1..{len(classes)}")
        samples.append((_need_file(os.path.join(folder, str(r["fname"])), "Stanford Cars image"), label))
    return ImageList(samples, classes, transform, seed)


AIRCRAFT_LEVELS = ("variant", "family", "manufacturer")


def fgvc_aircraft(
    root: str, split: str, transform: ImageTransform, seed: int = 0, annotation: str = "variant"
) -> ImageList:
    """FGVC-Aircraft from its release: ``root/data/images/<id>.jpg``, ``root/data/images_<level>_<split>.txt``
    (lines ``<id> <name>``, the name may hold spaces) and ``root/data/<level>s.txt`` (the class
    names, one per line; ``variants.txt`` for 100 variants). ``split``: train, val, trainval,
    test; ``annotation``: variant, family or manufacturer. ``root`` may also be the ``data``
    folder itself."""
    if split not in ("train", "val", "trainval", "test"):
        raise ValueError(f"split must be train, val, trainval or test, got {split!r}")
    if annotation not in AIRCRAFT_LEVELS:
        raise ValueError(f"data.annotation must be one of {AIRCRAFT_LEVELS}, got {annotation!r}")
    if not os.path.isdir(root):
        raise ValueError(f"data.root {root!r} is not a directory (expected the fgvc-aircraft folder holding data/)")
    data = os.path.join(root, "data")
    if not os.path.isdir(data) and os.path.isdir(os.path.join(root, "images")):
        data = root
    names_file = _need_file(os.path.join(data, f"{annotation}s.txt"), "FGVC-Aircraft")
    with open(names_file) as f:
        classes = [line.strip() for line in f if line.strip()]
    index = {c: i for i, c in enumerate(classes)}
    list_file = _need_file(os.path.join(data, f"images_{annotation}_{split}.txt"), "FGVC-Aircraft")
    samples = []
    with open(list_file) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.strip().split(" ", 1)
            if len(parts) != 2 or parts[1] not in index:
                raise ValueError(
                    f"{list_file} line {n}: expected '<image id> <{annotation} from "
                    f"{os.path.basename(names_file)}>', got {line.strip()!r}"
                )
            path = _need_file(os.path.join(data, "images", parts[0] + ".jpg"), "FGVC-Aircraft image")
            samples.append((path, index[parts[1]]))
    return ImageList(samples, classes, transform, seed)


def _test_split(read):
    """A dataset read by ``read(root, split, transform, seed)`` with its own train / test split."""

    def splits(root, tr, ev, seed, **options):
        return read(root, "train", tr, seed), read(root, "test", ev, seed)

    return splits


AIRCRAFT_OPTIONS = {"annotation": "variant", "train_split": "trainval", "val_split": "test"}  # the defaults


def _aircraft_splits(root, tr, ev, seed, **options):
    o = {**AIRCRAFT_OPTIONS, **options}
    return (
        fgvc_aircraft(root, o["train_split"], tr, seed, o["annotation"]),
        fgvc_aircraft(root, o["val_split"], ev, seed, o["annotation"]),
    )


def _folder_splits(root, tr, ev, seed, **options):
    return folder_splits(root, tr, ev, seed)


# name -> reader of its (train, validation) splits: (root, train transform, val transform, seed,
# **options) -> (ImageList, ImageList)
IMAGE_SPLITS = {
    "folder": _folder_splits,
    "imagefolder": _folder_splits,
    "cub": _test_split(cub200),
    "cars": _test_split(stanford_cars),
    "aircraft": _aircraft_splits,
}
IMAGE_DATASETS = tuple(IMAGE_SPLITS)


def image_dataset_splits(
    name: str, root: str, train_transform: ImageTransform, val_transform: ImageTransform, seed: int = 0, **options
) -> Tuple[ImageList, ImageList]:
    """(train, validation) of an image dataset on disk: ``folder`` (= ``imagefolder``: ``root/train``,
    ``root/val``), ``cub`` (train / test), ``cars`` (Stanford Cars, train / test), ``aircraft``
    (FGVC-Aircraft; ``options``: ``annotation`` (variant), ``train_split`` (trainval), ``val_split``
    (test)). Each has ``num_classes``."""
    if name not in IMAGE_SPLITS:
        raise ValueError(f"unknown image dataset {name!r}; expected one of {IMAGE_DATASETS}")
    return IMAGE_SPLITS[name](root, train_transform, val_transform, seed, **options)


# ----------------------------------------------------------------------------- synthetic images


class SyntheticFineGrained(EpochDataset):
    """Images whose classes differ only in a small local detail, generated on the fly.

    Every image, whatever its class, has the same kind of content: a smooth, weakly coloured random
    background, a large "body" (an ellipse of random grey-ish colour, size and place) and noise.
    The class is told only by a small "detail" drawn at a random place on the body: a ``detail`` x
    ``detail`` pixel glyph (about 1/25 of the image at the defaults) of a saturated colour and a
    3x3 pattern, both of its class. Global statistics carry almost no class information, so a model
    has to find the detail, the situation DCAL's GLCA (local queries chosen by attention rollout)
    is made for.

    Samples are a function of ``(seed, index)`` (the split offsets the index, so train and
    validation images differ); training adds a random flip per epoch.
    """

    def __init__(
        self,
        size: int,
        img_size: int = 32,
        num_classes: int = 10,
        detail: Optional[int] = None,
        seed: int = 0,
        split: str = "train",
        noise: float = 0.05,
    ):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if img_size < 16:
            raise ValueError(f"img_size must be >= 16, got {img_size}")
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.size, self.img_size, self.num_classes = int(size), int(img_size), int(num_classes)
        self.detail = int(detail) if detail is not None else max(5, img_size // 5)
        self.seed, self.split, self.noise = seed, split, noise
        self.offset = 0 if split == "train" else 10_000_000
        g = torch.Generator().manual_seed(12345)  # the class definitions never depend on the run's seed
        patterns, used = [], set()
        while len(patterns) < num_classes:
            p = torch.rand(3, 3, generator=g) < 0.5
            key = tuple(p.flatten().tolist())
            # distinct, not trivially blank or full, and not a mirror image of another class
            # (training flips images)
            mirror = tuple(p.flip(-1).flatten().tolist())
            if 3 <= int(p.sum()) <= 6 and key not in used and mirror not in used:
                used.update({key, mirror})
                patterns.append(p.float())
        self.patterns = torch.stack(patterns)  # [C, 3, 3]
        # saturated colours evenly spread around the hue circle
        hue = torch.arange(num_classes, dtype=torch.float32) / num_classes
        k = (torch.tensor([5.0, 3.0, 1.0]) + hue[:, None] * 6) % 6
        self.colors = 1 - (torch.minimum(k, 4 - k).clamp(0, 1))  # [C, RGB]

    def __len__(self) -> int:
        return self.size

    def render(self, index: int) -> Tuple[Tensor, int]:
        """The image [3, S, S] in [0, 1] and its label, before augmentation."""
        S, d = self.img_size, self.detail
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.offset + index)
        label = int(torch.randint(0, self.num_classes, (1,), generator=g))
        grey = lambda *shape: (
            torch.rand(1, *shape[1:], generator=g) * 0.6
            + 0.2  # noqa: E731
            + (torch.rand(*shape, generator=g) - 0.5) * 0.2
        )
        img = torch.nn.functional.interpolate(grey(3, 4, 4)[None], size=(S, S), mode="bilinear", align_corners=False)[0]
        yy, xx = torch.meshgrid(
            torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32), indexing="ij"
        )
        cy, cx = (torch.rand(2, generator=g) * 0.4 + 0.3) * S
        ry, rx = (torch.rand(2, generator=g) * 0.15 + 0.25) * S
        body = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        img = torch.where(body, grey(3, 1, 1), img)
        # the detail sits inside the body, anywhere (not aligned to a patch grid)
        oy = int((cy + (torch.rand((), generator=g) - 0.5) * ry).clamp(0, S - d))
        ox = int((cx + (torch.rand((), generator=g) - 0.5) * rx).clamp(0, S - d))
        pat = torch.nn.functional.interpolate(self.patterns[label][None, None], size=(d, d), mode="nearest")[0]
        img[:, oy : oy + d, ox : ox + d] = pat * self.colors[label][:, None, None]
        img = img + self.noise * torch.randn(3, S, S, generator=g)
        return img.clamp(0, 1), label

    def __getitem__(self, index: int):
        img, label = self.render(index)
        if self.split == "train" and bool(torch.rand((), generator=sample_rng(self.seed, self.epoch, index)) < 0.5):
            img = img.flip(-1)
        return (img - 0.5) / 0.25, label


# ----------------------------------------------------------------------------- synthetic BEV


class SyntheticBEV(EpochDataset):
    """A bird's-eye-view map task that needs local context: channel 0 of the input holds sparse
    points (each cell occupied with probability ``density``), the other channels noise; the
    target of each cell is the number of points in its ``window`` x ``window`` neighbourhood,
    capped at 2 (classes 0, 1, 2; about equally frequent at the defaults). A per-cell model sees
    no neighbours and cannot solve it; a 7x7 neighbourhood attention can.

    Returns ``(x [in_channels, X, Y], y [X, Y] int64)``.
    """

    num_classes = 3

    def __init__(
        self,
        size: int,
        map_size: Sequence[int] = (32, 32),
        in_channels: int = 4,
        window: int = 5,
        density: float = 0.05,
        seed: int = 0,
        split: str = "train",
    ):
        if window % 2 != 1 or window < 1:
            raise ValueError(f"window must be a positive odd number, got {window}")
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.size, self.map_size, self.in_channels = int(size), tuple(int(s) for s in map_size), int(in_channels)
        self.window, self.density, self.seed = window, density, seed
        self.offset = 0 if split == "train" else 10_000_000

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        X, Y = self.map_size
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.offset + index)
        points = (torch.rand(1, X, Y, generator=g) < self.density).float()
        x = torch.cat([points, torch.randn(self.in_channels - 1, X, Y, generator=g)], 0)
        w = self.window
        counts = torch.nn.functional.conv2d(points[None], torch.ones(1, 1, w, w), padding=w // 2)[0, 0]
        return x, counts.clamp(max=2).long()


# ----------------------------------------------------------------------------- helpers


def _stack(items):
    if isinstance(items[0], Tensor):
        return torch.stack(items)
    if isinstance(items[0], (tuple, list)):
        return type(items[0])(_stack([it[i] for it in items]) for i in range(len(items[0])))
    return torch.as_tensor(items)


def collate(batch):
    """``(input, target)`` samples -> batched ``(input, target)``; an input that is a tuple of
    tensors (an image and its caption) becomes a tuple of batched tensors."""
    xs, ys = zip(*batch)
    return _stack(list(xs)), _stack(list(ys))


def set_epoch(dataset, epoch: int) -> None:
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)


# ----------------------------------------------------------------------------- synthetic captions


COLOUR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan")
COLOUR_RGB = (
    (0.9, 0.1, 0.1),
    (0.1, 0.8, 0.1),
    (0.15, 0.25, 0.95),
    (0.9, 0.85, 0.1),
    (0.85, 0.1, 0.85),
    (0.1, 0.85, 0.85),
)
SHAPE_NAMES = ("square", "circle", "triangle", "cross")
CAPTION_TEMPLATES = (
    "a photo of a {c} {s}",
    "a {c} {s}",
    "a picture of a {c} {s}",
    "the {c} {s}",
    "a {s} that is {c}",
    "a small {c} {s}",
    "a big {c} {s}",
)


class WordTokenizer:
    """Whitespace word tokenizer over a fixed vocabulary: id 0 pads, the largest id
    (``vocab_size - 1``) ends the text (CLIP's convention: pooling at ``argmax``)."""

    def __init__(self, words: Sequence[str], context_length: int = 12):
        self.words = sorted(set(words))
        self.ids = {w: i + 1 for i, w in enumerate(self.words)}
        self.vocab_size = len(self.words) + 2
        self.eot = self.vocab_size - 1
        self.context_length = context_length

    def __call__(self, texts: Sequence[str]) -> Tensor:
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [self.ids[w] for w in t.split()][: self.context_length - 1] + [self.eot]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


class SyntheticCaptions(EpochDataset):
    """Images of a coloured shape with a caption naming it: ``num_colours`` x ``num_shapes``
    classes (at most 6 x 4; chance 1 / classes), for contrastive image-text training.

    An image is a smooth grey background with noise and one filled shape (square, circle,
    triangle, cross) of its class's colour (brightness jittered), of random size and place. Its
    caption fills one of several templates ("a photo of a red circle", "a circle that is red", ...)
    drawn per sample and epoch in training; validation uses "a photo of a {colour} {shape}", which
    is also what :meth:`class_texts` returns for zero-shot classification.

    Items: ``((image [3, S, S], tokens [L]), label)``; ``tokenizer`` maps a list of strings to
    ``[n, L]`` ids (default: a :class:`WordTokenizer` of the captions' words, ``self.tokenizer``).
    """

    def __init__(
        self,
        size: int,
        img_size: int = 32,
        num_colours: int = 4,
        num_shapes: int = 3,
        seed: int = 0,
        split: str = "train",
        noise: float = 0.05,
        tokenizer=None,
        context_length: int = 12,
    ):
        if not 1 <= num_colours <= len(COLOUR_NAMES) or not 1 <= num_shapes <= len(SHAPE_NAMES):
            raise ValueError(
                f"num_colours must be in 1..{len(COLOUR_NAMES)} and num_shapes in 1..{len(SHAPE_NAMES)}, "
                f"got {num_colours} and {num_shapes}"
            )
        if num_colours * num_shapes < 2:
            raise ValueError("SyntheticCaptions needs at least 2 classes")
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if img_size < 16:
            raise ValueError(f"img_size must be >= 16, got {img_size}")
        self.size, self.img_size, self.seed, self.split, self.noise = int(size), int(img_size), seed, split, noise
        self.colours, self.shapes = COLOUR_NAMES[:num_colours], SHAPE_NAMES[:num_shapes]
        self.num_classes = num_colours * num_shapes
        self.offset = 0 if split == "train" else 10_000_000
        words = {w for t in CAPTION_TEMPLATES for w in t.split() if "{" not in w}
        self.tokenizer = tokenizer or WordTokenizer(
            sorted(words | set(self.colours) | set(self.shapes)), context_length
        )

    def __len__(self) -> int:
        return self.size

    def class_name(self, label: int):
        return self.colours[label // len(self.shapes)], self.shapes[label % len(self.shapes)]

    def class_texts(self) -> List[str]:
        return [CAPTION_TEMPLATES[0].format(c=c, s=s) for c, s in map(self.class_name, range(self.num_classes))]

    def class_tokens(self) -> Tensor:
        """[classes, L]: the validation caption of every class (zero-shot classifier)."""
        return self.tokenizer(self.class_texts())

    def render(self, index: int) -> Tuple[Tensor, int]:
        S = self.img_size
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.offset + index + 17)
        label = int(torch.randint(0, self.num_classes, (1,), generator=g))
        ci = label // len(self.shapes)
        shape = self.shapes[label % len(self.shapes)]
        bg = torch.rand(1, 1, 4, 4, generator=g) * 0.5 + 0.25
        img = torch.nn.functional.interpolate(bg, size=(S, S), mode="bilinear", align_corners=False)[0].expand(3, S, S)
        yy, xx = torch.meshgrid(
            torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32), indexing="ij"
        )
        r = float(torch.rand((), generator=g) * 0.15 + 0.15) * S
        cy, cx = (torch.rand(2, generator=g) * (S - 2 * r) + r).tolist()
        dy, dx = (yy - cy) / r, (xx - cx) / r
        if shape == "square":
            mask = (dy.abs() <= 0.8) & (dx.abs() <= 0.8)
        elif shape == "circle":
            mask = dy**2 + dx**2 <= 1.0
        elif shape == "triangle":
            mask = (dy <= 0.8) & (dy >= -1.0 + 2 * dx.abs())
        else:
            mask = ((dy.abs() <= 0.3) & (dx.abs() <= 1.0)) | ((dx.abs() <= 0.3) & (dy.abs() <= 1.0))
        colour = torch.tensor(COLOUR_RGB[ci]) * (0.8 + 0.2 * torch.rand((), generator=g))
        img = torch.where(mask, colour[:, None, None], img)
        img = img + self.noise * torch.randn(3, S, S, generator=g)
        return img.clamp(0, 1), label

    def __getitem__(self, index: int):
        img, label = self.render(index)
        if self.split == "train":
            g = sample_rng(self.seed, self.epoch, index)
            if bool(torch.rand((), generator=g) < 0.5):
                img = img.flip(-1)
            template = CAPTION_TEMPLATES[int(torch.randint(0, len(CAPTION_TEMPLATES), (1,), generator=g))]
        else:
            template = CAPTION_TEMPLATES[0]
        c, s = self.class_name(label)
        tokens = self.tokenizer([template.format(c=c, s=s)])[0]
        return ((img - 0.5) / 0.25, tokens), label


# ----------------------------------------------------------------------------- synthetic few-shot classes


FEWSHOT_PALETTE = ((0.9, 0.2, 0.2), (0.2, 0.8, 0.2), (0.2, 0.3, 0.9), (0.9, 0.9, 0.3))


class SyntheticFewShot(EpochDataset):
    """Many small classes for few-shot learning: class ``c`` (global id ``first_class + c``) is a
    4x4 binary glyph in two colours of a 4-colour palette, drawn from a generator seeded by the global id, so
    training and validation sets with disjoint ``first_class`` ranges hold disjoint (novel)
    classes. A sample puts its class's glyph (cells of ``cell`` px) at a random place on a random
    grey background, with brightness jitter and noise. ``per_class`` samples per class; sample
    ``i`` has label ``i % num_classes`` (``self.labels``)."""

    def __init__(
        self,
        num_classes: int,
        per_class: int,
        img_size: int = 20,
        cell: int = 3,
        first_class: int = 0,
        seed: int = 0,
        noise: float = 0.08,
    ):
        if num_classes < 2 or per_class < 1:
            raise ValueError(f"num_classes must be >= 2 and per_class >= 1, got {num_classes} and {per_class}")
        if img_size < 4 * cell:
            raise ValueError(f"img_size ({img_size}) must hold the 4x4 glyph of cell {cell} px ({4 * cell} px)")
        self.num_classes, self.per_class, self.img_size, self.cell = int(num_classes), int(per_class), img_size, cell
        self.first_class, self.seed, self.noise = first_class, seed, noise
        glyphs, colours = [], []
        for c in range(num_classes):
            g = torch.Generator().manual_seed(987_654 + first_class + c)
            while True:
                p = torch.rand(4, 4, generator=g) < 0.5
                if 5 <= int(p.sum()) <= 11:
                    break
            glyphs.append(p)
            # two different colours of a small palette: many classes share colours, so the
            # glyph's pattern is what tells them apart
            pair = torch.randperm(len(FEWSHOT_PALETTE), generator=g)[:2]
            colours.append(torch.tensor(FEWSHOT_PALETTE)[pair])
        self.glyphs, self.glyph_colours = torch.stack(glyphs), torch.stack(colours)  # [C, 4, 4], [C, 2, 3]
        self.labels = [i % self.num_classes for i in range(len(self))]

    def __len__(self) -> int:
        return self.num_classes * self.per_class

    def __getitem__(self, index: int):
        S, d = self.img_size, 4 * self.cell
        label = index % self.num_classes
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + (self.first_class * 100_003 + index) * 7 + 3)
        img = (torch.rand(1, 1, 1, generator=g) * 0.6 + 0.2).expand(3, S, S).clone()
        on = self.glyphs[label].repeat_interleave(self.cell, 0).repeat_interleave(self.cell, 1)  # [d, d]
        cols = self.glyph_colours[label] * (0.7 + 0.5 * torch.rand(2, 1, generator=g))
        glyph = torch.where(on[None], cols[0][:, None, None], cols[1][:, None, None])
        oy, ox = (int(v) for v in torch.randint(0, S - d + 1, (2,), generator=g))
        img[:, oy : oy + d, ox : ox + d] = glyph
        img = (img + self.noise * torch.randn(3, S, S, generator=g)).clamp(0, 1)
        return (img - 0.5) / 0.25, label
