"""The training loop: accumulation, resume, atomic checkpoints, AMP, skipped steps, OOM retry,
optimiser groups, schedule, configs and data. Small stand-in models, CPU, fp64 where exactness
is asserted."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler

from dcal.train import checkpoint as ckpt
from dcal.train import config as C
from dcal.train import data as D
from dcal.train.trainer import CosineWarmup, Trainer, param_groups


class Points(torch.utils.data.Dataset):
    """Random features with labels from a fixed linear rule (learnable, deterministic)."""

    def __init__(self, n, dim=7, classes=3, dtype=torch.float64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g, dtype=dtype)
        w = torch.randn(dim, classes, generator=g, dtype=dtype)
        self.y = (self.x @ w).argmax(1)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class Net(nn.Module):
    """No batch-dependent layer; optional dropout to exercise RNG restore."""

    def __init__(self, dim=7, classes=3, hidden=11, dropout=0.0, dtype=torch.float64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(dim, hidden, dtype=dtype)
        self.norm = nn.LayerNorm(hidden, dtype=dtype)
        self.fc2 = nn.Linear(hidden, classes, dtype=dtype)
        self.drop = nn.Dropout(dropout)
        self.pos = nn.Parameter(torch.zeros(1, hidden, dtype=dtype))

    def no_weight_decay(self):
        return {"pos"}

    def forward(self, x):
        return self.fc2(self.drop(self.norm(F.gelu(self.fc1(x)) + self.pos)))


def ce(out, y):
    return F.cross_entropy(out, y)


def cfg(**kw):
    base = dict(
        epochs=1,
        effective_batch=8,
        micro_batch=8,
        base_lr=0.5,
        warmup_epochs=0.5,
        clip_grad=1.0,
        weight_decay=0.05,
        progress=False,
        seed=3,
    )
    base.update(kw)
    return C.TrainConfig(**base)


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a, b, atol=0.0, rtol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


def train(n=21, out_dir=None, model=None, resume=None, **kw):
    model = model or Net()
    t = Trainer(model, ce, Points(n), Points(9, seed=1), cfg(**kw), out_dir=out_dir)
    t.fit(resume=resume)
    return t


# ----------------------------------------------------------------------------- accumulation


def reference_training(n, effective_batch, c: C.TrainConfig):
    """Plain full-group training: one forward of the whole group per step, the group mean loss."""
    model = Net()
    data = Points(n)
    opt = torch.optim.AdamW(param_groups(model, c.weight_decay), lr=0.0, betas=tuple(c.betas))
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=c.seed)
    sampler.set_epoch(0)
    idx = list(sampler)
    groups = [idx[i : i + effective_batch] for i in range(0, len(idx), effective_batch)]
    peak = c.base_lr * effective_batch / 512
    sched = CosineWarmup(peak, c.min_lr, round(c.warmup_epochs * len(groups)), c.epochs * len(groups))
    for g in groups:
        x = data.x[g]
        y = data.y[g]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.clip_grad)
        for pg in opt.param_groups:
            pg["lr"] = sched.lr()
        opt.step()
        sched.step_count += 1
    return params(model)


@pytest.mark.parametrize("micro", [1, 3, 4], ids=lambda m: f"micro{m}")
@pytest.mark.parametrize("n", [8, 21], ids=lambda n: f"n{n}")  # 21 = 2 full groups of 8 + a short one of 5
def test_accumulation_equals_full_batch(n, micro):
    full = train(n=n, micro_batch=8)
    acc = train(n=n, micro_batch=micro)
    assert full.step == acc.step == math.ceil(n / 8)
    assert_same(params(acc.model), params(full.model), atol=1e-12, rtol=1e-12)
    assert_same(params(full.model), reference_training(n, 8, full.cfg), atol=1e-12, rtol=1e-12)


def test_short_last_group_is_a_mean_over_its_samples():
    # one step on a short group of 5 as micro-batches 3 + 2: the gradient is the mean over 5
    # samples, not the mean of the two micro-batch means
    model = Net()
    data = Points(5)
    t = Trainer(model, ce, data, None, cfg(effective_batch=8, micro_batch=3, clip_grad=None))
    x, y = data.x, data.y
    ref = Net()
    F.cross_entropy(ref(x), y).backward()
    grads = {}
    orig_step = t.optimizer.step

    def capture(*a, **k):
        grads.update({n: p.grad.clone() for n, p in model.named_parameters()})
        return orig_step(*a, **k)

    t.optimizer.step = capture
    t.micro_batch = 3
    t.train_step((x, y), 5)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-13, rtol=1e-12)


def test_lr_scaled_by_effective_batch():
    t = Trainer(Net(), ce, Points(16), None, cfg(effective_batch=16, base_lr=5e-4))
    assert t.peak_lr == pytest.approx(5e-4 * 16 / 512)


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("stop_after", [3, 4], ids=["epoch_boundary", "mid_epoch"])
def test_resume_is_exact(tmp_path, stop_after):
    # 21 samples, groups of 6 -> 4 steps per epoch; dropout makes the result depend on the RNG
    kw = dict(n=21, epochs=2, effective_batch=6, micro_batch=4)
    straight = train(out_dir=str(tmp_path / "a"), model=Net(dropout=0.2), **kw)
    steps_per_epoch = straight.groups_per_epoch
    first = train(
        out_dir=str(tmp_path / "b"), model=Net(dropout=0.2), max_steps=steps_per_epoch + (stop_after - 3), **kw
    )
    assert first.step == steps_per_epoch + (stop_after - 3)
    latest = ckpt.CheckpointDir(str(tmp_path / "b")).latest()
    # a differently initialised model: everything must come from the checkpoint
    second = train(out_dir=str(tmp_path / "b"), model=Net(dropout=0.2, seed=99), resume=latest, **kw)
    assert second.step == straight.step == 2 * steps_per_epoch
    assert_same(params(second.model), params(straight.model))
    assert second.optimizer.state_dict()["state"][0]["exp_avg"].equal(
        straight.optimizer.state_dict()["state"][0]["exp_avg"]
    )
    rows = [json.loads(l) for l in open(tmp_path / "b" / "metrics.jsonl")]
    straight_rows = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
    assert rows[-1]["train_loss"] == pytest.approx(straight_rows[-1]["train_loss"], rel=1e-12)
    assert rows[-1]["val_acc"] == straight_rows[-1]["val_acc"]


def test_checkpoint_holds_full_state_and_loads_weights_only(tmp_path):
    t = train(out_dir=str(tmp_path), epochs=2, keep_last=1)
    d = ckpt.CheckpointDir(str(tmp_path))
    assert len(d.list()) == 1 and os.path.isfile(d.best_path)
    state = torch.load(d.latest(), weights_only=True)
    for key in ("model", "optimizer", "scaler", "schedule", "rng", "epoch", "group_in_epoch", "step"):
        assert key in state
    assert state["step"] == t.step and state["epoch"] == 2 and state["schedule"]["step_count"] == t.step


# ----------------------------------------------------------------------------- atomic write


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    ckpt.atomic_save({"w": torch.arange(5.0)}, path)
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"partial garbage")  # half a file reaches the disk, then the process "dies"
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_save({"w": torch.zeros(5)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True)["w"].equal(torch.arange(5.0))
    assert os.listdir(tmp_path) == ["c.pt"]  # no temporary left behind


def test_interrupted_trainer_checkpoint_resumes_from_previous(tmp_path, monkeypatch):
    t = train(out_dir=str(tmp_path), epochs=1)
    good = ckpt.CheckpointDir(str(tmp_path)).latest()

    def dying_save(obj, f, *a, **k):
        f.write(b"x" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        t.save()
    monkeypatch.undo()
    assert ckpt.CheckpointDir(str(tmp_path)).latest() == good
    assert ckpt.load(good)["step"] == t.step


# ----------------------------------------------------------------------------- AMP and skipped steps


class Recorder:
    """Wraps clip_grad_norm_ to record the norm it measured."""

    def __init__(self, monkeypatch):
        self.norms = []
        real = torch.nn.utils.clip_grad_norm_

        def rec(ps, max_norm, *a, **k):
            n = real(ps, max_norm, *a, **k)
            self.norms.append(float(n))
            return n

        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", rec)


@pytest.mark.parametrize("amp, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)], ids=["fp16", "bf16"])
def test_amp_on_cpu(monkeypatch, amp, dtype):
    seen = []

    def loss(out, y):
        seen.append(out.dtype)
        return F.cross_entropy(out.float(), y)

    rec = Recorder(monkeypatch)
    data = Points(24, dtype=torch.float32)
    ref_model = Net(dtype=torch.float32)
    Trainer(ref_model, loss, data, None, cfg(effective_batch=8, micro_batch=4, clip_grad=10.0)).fit()
    ref_norms, rec.norms = rec.norms, []
    seen.clear()
    model = Net(dtype=torch.float32)
    t = Trainer(model, loss, data, None, cfg(effective_batch=8, micro_batch=4, clip_grad=10.0, amp=amp))
    init = params(model)
    t.fit()
    assert set(seen) == {dtype}
    assert t.scaler.is_enabled() == (amp == "fp16")
    if amp == "fp16":
        assert t.scaler.get_scale() > 1.0
    assert t.skipped_steps == 0
    # the clipped norm is that of the true (unscaled) gradients: close to the fp32 run's, not
    # 65536 times larger
    for a, b in zip(rec.norms, ref_norms):
        assert a == pytest.approx(b, rel=0.05)
    moved = max(float((model.state_dict()[k] - init[k]).abs().max()) for k in init)
    assert moved > 0 and all(torch.isfinite(v).all() for v in model.state_dict().values())


@pytest.mark.parametrize("amp", ["none", "fp16"])
def test_inf_gradient_skips_step(amp, capsys):
    model = Net(dtype=torch.float32)
    data = Points(24, dtype=torch.float32)
    t = Trainer(model, ce, data, None, cfg(effective_batch=8, micro_batch=4, amp=amp))
    poison = {"on": False}
    model.fc1.weight.register_hook(lambda g: torch.full_like(g, float("inf")) if poison["on"] else g)
    batch = (data.x[:8], data.y[:8])
    t.micro_batch = 4
    t.train_step(batch, 8)
    before, opt_before = params(model), t.optimizer.state_dict()["state"][0]["exp_avg"].clone()
    scale_before = t.scaler.get_scale() if amp == "fp16" else None
    poison["on"] = True
    r = t.train_step(batch, 8)
    assert r["skipped"] and t.skipped_steps == 1
    assert_same(params(model), before)  # no update, no weight decay
    assert t.optimizer.state_dict()["state"][0]["exp_avg"].equal(opt_before)
    if amp == "fp16":
        assert t.scaler.get_scale() == scale_before / 2
    assert "skipped" in capsys.readouterr().err
    poison["on"] = False
    assert not t.train_step(batch, 8)["skipped"]
    assert t.step == 3 and t.skipped_steps == 1


# ----------------------------------------------------------------------------- OOM retry


class OOMOnce(Net):
    """Raises torch.OutOfMemoryError the first time it sees a batch larger than ``limit`` on its
    ``when``-th call (so after earlier micro-batches have already accumulated gradients)."""

    def __init__(self, limit, when=1):
        super().__init__()
        self.limit, self.when, self.calls, self.raised = limit, when, 0, 0

    def forward(self, x):
        self.calls += 1
        if self.training and x.shape[0] > self.limit and self.calls >= self.when and not self.raised:
            self.raised += 1
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return super().forward(x)


@pytest.mark.parametrize("when, limit, start", [(1, 4, 8), (2, 2, 4)], ids=["first_micro", "after_a_micro_step"])
def test_oom_halves_micro_batch_and_keeps_the_step(tmp_path, when, limit, start):
    # after_a_micro_step: the group of 8 runs as 4 + 4 and the second micro-batch runs out, after
    # the first has accumulated its gradients: those must not be counted twice
    plain = train(n=21, micro_batch=limit, effective_batch=8)
    model = OOMOnce(limit=limit, when=when)
    t = train(n=21, model=model, micro_batch=start, effective_batch=8, out_dir=str(tmp_path))
    assert model.raised == 1
    assert t.micro_batch == limit == start // 2
    assert t.oom_events == [{"step": 0, "from": start, "to": limit}]
    assert t.step == plain.step == 3  # no step lost
    row = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert row["effective_batch"] == 8 and row["micro_batch"] == t.micro_batch
    steps = [json.loads(l) for l in open(tmp_path / "steps.jsonl")]
    assert [s["step"] for s in steps] == [1, 2, 3] and steps[0]["micro_batch"] == limit
    assert all(s["effective_batch"] == 8 and s["peak_mem_mb"] > 0 for s in steps)
    # same samples, same effective batch: the same parameters as a run that never ran out
    assert_same(params(t.model), params(plain.model), atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------- pieces


def test_param_groups_no_decay():
    groups = param_groups(Net(), 0.05)
    model = Net()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.05)
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert decay == {"fc1.weight", "fc2.weight"}
    assert no_decay == {"fc1.bias", "fc2.bias", "norm.weight", "norm.bias", "pos"}
    assert groups[1]["weight_decay"] == 0.0

    class WithLossWeights(Net):
        def __init__(self):
            super().__init__()
            self.loss_weights = nn.Parameter(torch.zeros(3, 1))  # 2-D on purpose

    m = WithLossWeights()
    names = {id(p): n for n, p in m.named_parameters()}
    assert "loss_weights" in {names[id(p)] for p in param_groups(m, 0.1)[1]["params"]}


def test_cosine_warmup():
    s = CosineWarmup(1.0, 0.0, warmup=4, total=14)
    lrs = [s.lr(i) for i in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert (
        lrs[4] == pytest.approx(1.0)
        and lrs[9] == pytest.approx(0.5)
        and lrs[13] == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 10)))
    )
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"train": {"epochz": 3}}, "train.epochz"),
        ({"train": {"amp": "fp8"}}, "train.amp"),
        ({"train": {"micro_batch": 0}}, "train.micro_batch"),
        ({"train": {"max_memory": "lots"}}, "train.max_memory"),
        ({"train": {"effective_batch": 2.5}}, "train.effective_batch"),
        ({"optim": {}}, "optim"),
    ],
    ids=["unknown_key", "bad_amp", "zero_micro", "bad_memory", "float_batch", "unknown_section"],
)
def test_config_rejects_bad_keys_and_values(raw, key):
    raw = {"model": {"name": "mlp"}, "data": {"name": "synthetic"}, **raw}
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        C.from_dict(raw)


def test_config_overrides_and_sizes():
    c = C.from_dict(
        {"model": {"name": "mlp"}, "data": {"name": "synthetic"}},
        ["train.epochs=3", "train.amp=bf16", "model.hidden=5", "train.max_memory=1.5GB"],
    )
    assert c.train.epochs == 3 and c.train.amp == "bf16" and c.model["hidden"] == 5
    assert C.parse_bytes(c.train.max_memory) == int(1.5 * 2**30)
    assert C.parse_bytes("512MiB") == 512 * 2**20 and C.parse_bytes(2**20) == 2**20
    with pytest.raises(ValueError, match="without a unit"):
        C.parse_bytes(1000)  # a bare number is bytes: under 1 MiB it is a forgotten unit
    with pytest.raises(ValueError, match="--set"):
        C.from_dict({"model": {"name": "mlp"}, "data": {"name": "synthetic"}}, ["epochs=3"])


@pytest.mark.parametrize(
    "name", ["demo.yaml", "cub_vitb16_448.yaml", "bev_demo.yaml", "clip_demo.yaml", "fewshot_demo.yaml"]
)
def test_shipped_configs_parse(name):
    path = os.path.join(os.path.dirname(__file__), "..", "configs", name)
    c = C.load(path)
    assert c.train.effective_batch >= 1


# ----------------------------------------------------------------------------- data


def test_synthetic_classes_differ_only_locally():
    ds = D.SyntheticFineGrained(64, img_size=32, num_classes=4, split="val")
    imgs, labels = zip(*(ds.render(i) for i in range(64)))
    imgs = torch.stack(imgs)
    labels = torch.tensor(labels)
    assert set(labels.tolist()) == {0, 1, 2, 3}
    # deterministic per index, and train/val differ
    assert ds.render(5)[0].equal(imgs[5])
    assert not D.SyntheticFineGrained(8, img_size=32, num_classes=4, split="train").render(5)[0].equal(imgs[5])
    # the class detail covers ~1/64 of the image: global colour statistics carry no class signal
    means = torch.stack([imgs[labels == c].mean((0, 2, 3)) for c in range(4)])
    assert (means - means.mean(0)).abs().max() < 0.06
    assert ds.detail * ds.detail / (32 * 32) <= 1 / 16


def test_image_transform_and_cub_format(tmp_path):
    from PIL import Image

    root = tmp_path / "CUB_200_2011"
    (root / "images" / "001.A").mkdir(parents=True)
    (root / "images" / "002.B").mkdir(parents=True)
    rows, labels, split = [], [], []
    for i in range(1, 5):
        cls = 1 if i <= 2 else 2
        rel = f"{'001.A' if cls == 1 else '002.B'}/img{i}.jpg"
        Image.new("RGB", (37 + i, 29), color=(10 * i, 20, 30)).save(root / "images" / rel)
        rows.append(f"{i} {rel}")
        labels.append(f"{i} {cls}")
        split.append(f"{i} {1 if i % 2 else 0}")
    (root / "images.txt").write_text("\n".join(rows) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    train = D.cub200(str(root), "train", D.ImageTransform(True, resize=20, crop=16))
    test = D.cub200(str(root), "test", D.ImageTransform(False, resize=20, crop=16))
    assert [lbl for _, lbl in train.samples] == [0, 1] and [lbl for _, lbl in test.samples] == [0, 1]
    x, y = train[0]
    assert x.shape == (3, 16, 16) and y == 0
    assert train[1][0].equal(train[1][0])  # same epoch, same sample: same crop
    # eval: the centre crop of the resized image
    img = Image.open(test.samples[0][0]).convert("RGB").resize((20, 20), Image.BILINEAR)
    import numpy as np

    ref = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float()[:, 2:18, 2:18] / 255
    ref = (ref - torch.tensor(D.IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(D.IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(test[0][0], ref)
    folder = D.image_folder(str(root / "images"), D.ImageTransform(False, 20, 16))
    assert folder.classes == ["001.A", "002.B"] and len(folder) == 4
    with pytest.raises(ValueError, match="images.txt"):
        D.cub200(str(tmp_path), "train", D.ImageTransform(True, 20, 16))


def test_synthetic_bev_targets_need_neighbours():
    ds = D.SyntheticBEV(4, map_size=(13, 29), in_channels=3, split="val")
    x, y = ds[0]
    assert x.shape == (3, 13, 29) and y.shape == (13, 29)
    pts = x[0]
    i, j = 6, 10
    count = int(pts[i - 2 : i + 3, j - 2 : j + 3].sum())
    assert int(y[i, j]) == min(count, 2)
    freq = torch.bincount(torch.cat([ds[k][1].flatten() for k in range(4)]), minlength=3).float()
    assert (freq / freq.sum()).min() > 0.15  # three classes, none rare


# ----------------------------------------------------------------------------- automatic micro-batch


def test_fake_prediction_equals_real_tensor_peak():
    from dcal.train.autobatch import StorageTracker, predict_step_peak

    data = Points(8, dtype=torch.float32)
    sample = data[0]
    x, y = D.collate([sample] * 6)
    tracker = StorageTracker()
    with tracker:
        model = Net(dtype=torch.float32, hidden=257)
        opt = torch.optim.AdamW(model.parameters(), foreach=False)
        for step in range(2):
            if step == 1:
                tracker.peak = tracker.live
            for _ in range(2):
                ce(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    pred = predict_step_peak(lambda: Net(dtype=torch.float32, hidden=257), ce, sample, 6)
    # the update's temporaries are budgeted as one copy of the largest parameter
    largest = 257 * 7 * 4
    assert tracker.peak <= pred <= tracker.peak + largest


def test_auto_micro_batch_is_largest_that_fits(capsys):
    from dcal.train.autobatch import choose_micro_batch, predict_step_peak

    data = Points(64, dim=301, dtype=torch.float32)

    def factory():
        return Net(dim=301, hidden=513, dtype=torch.float32)

    p = {b: predict_step_peak(factory, ce, data[0], b) for b in (4, 5, 8)}
    assert p[4] < p[5] < p[8]
    budget = (p[4] + p[5]) // 2
    choice = choose_micro_batch(factory, ce, data[0], 16, budget)
    assert choice.micro_batch == 4  # 16 = 4 x 4; 5 or 6 would not fit
    assert choice.predicted_peak <= budget
    with pytest.raises(ValueError, match="max_memory"):
        choose_micro_batch(factory, ce, data[0], 16, 1000)
    # the trainer's budget is the process's: what it holds before the first step plus the step
    choice = choose_micro_batch(factory, ce, data[0], 16, budget + 2**30, fixed_cost=2**30)
    assert choice.micro_batch == 4 and choice.predicted_peak == 2**30 + p[4]
    t = Trainer(factory(), ce, data, None, cfg(effective_batch=16, micro_batch="auto"))
    t.fit()
    assert t.micro_batch == 16 and t.memory_report["measured_mb"] > 0
    err = capsys.readouterr().err
    assert "micro-batch 16 of 16" in err and "predicted step peak" in err and "measured" in err


def test_grad_checkpointing_switch():
    class WithSwitch(Net):
        enabled = False

        def set_grad_checkpointing(self, enable=True):
            self.enabled = enable

    m = WithSwitch()
    Trainer(m, ce, Points(8), None, cfg(grad_checkpointing=True))
    assert m.enabled
    with pytest.raises(ValueError, match="grad_checkpointing"):
        Trainer(Net(), ce, Points(8), None, cfg(grad_checkpointing=True))
