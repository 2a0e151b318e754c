"""Exact accumulation of losses that couple the samples of a batch (contrastive, episodic):
fp64 against the whole batch, the naive split shown to differ, dropout masks reproduced in the
re-run, AMP, 2-process gloo DDP against one process, and the refusals of bad input."""

import os
import socket

import pytest
import torch
from torch import nn

from dcal.models import CLIP, CLIPConfig, ProtoNet
from dcal.train import config as C
from dcal.train.coupled import ClipLoss, CoupledLoss, PrototypicalLoss, cached_backward, clip_loss
from dcal.train.episodes import Episodes
from dcal.train.trainer import Trainer

TOL = 1e-10
EOT = 9


def tiny_clip(dropout=0.0, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    c = CLIPConfig(
        embed_dim=16,
        img_size=8,
        patch_size=4,
        vision_width=16,
        vision_depth=1,
        vision_heads=1,
        vocab_size=EOT + 1,
        context_length=5,
        text_width=16,
        text_depth=1,
        text_heads=1,
        dropout=dropout,
    )
    return CLIP(c).to(dtype)


def pairs(n, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, 3, 8, 8, generator=g, dtype=dtype)
    tok = torch.randint(1, EOT, (n, 5), generator=g)
    tok[torch.arange(n), torch.randint(1, 5, (n,), generator=g)] = EOT
    return (img, tok), torch.arange(n)


def tiny_proto(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return ProtoNet(in_chans=3, hidden=8, depth=2).to(dtype)


def episodes(E, n_way=3, k=2, q=4, seed=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.arange(n_way).repeat_interleave(k), torch.arange(n_way).repeat_interleave(q)])
    # class-dependent images, so prototypes differ
    means = torch.randn(E, n_way, 3, 1, 1, generator=g, dtype=dtype)
    x = means[:, y] + 0.5 * torch.randn(E, len(y), 3, 8, 8, generator=g, dtype=dtype)
    return x, y.repeat(E, 1)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def full_batch(model, loss, inputs, target):
    """The reference: the whole batch in one forward with a graph."""
    model.zero_grad(set_to_none=True)
    value = loss.batch_loss(loss.forward_model(model, loss.rows(inputs)), target)
    value.backward()
    return value.detach(), grads(model)


def exact(model, loss, inputs, target, micro, **kw):
    model.zero_grad(set_to_none=True)
    value = cached_backward(model, loss, inputs, target, micro, **kw)
    return value, grads(model)


def max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def naive_clip(model, inputs, micro):
    """The usual accumulation: each micro-batch its own contrastive loss (its own negatives)."""
    model.zero_grad(set_to_none=True)
    (img, tok), n = inputs, inputs[0].shape[0]
    for s in range(0, n, micro):
        e = min(s + micro, n)
        (clip_loss(*model(img[s:e], tok[s:e])) * (e - s) / n).backward()
    return grads(model)


def naive_episodes(model, loss, x, y, parts):
    """The usual split of an episode: ``parts`` sub-episodes, each with its share of the shots
    and queries of every class, so each builds its own partial prototypes."""
    model.zero_grad(set_to_none=True)
    N, K, Q = loss.n_way, loss.k_shot, loss.q_query
    sub = PrototypicalLoss(N, K // parts, Q // parts, loss.vic_weight)
    for e in range(x.shape[0]):
        sup, qry = x[e, : N * K].view(N, K, *x.shape[2:]), x[e, N * K :].view(N, Q, *x.shape[2:])
        for p in range(parts):
            xs = torch.cat(
                [
                    sup[:, p * K // parts : (p + 1) * K // parts].flatten(0, 1),
                    qry[:, p * Q // parts : (p + 1) * Q // parts].flatten(0, 1),
                ]
            )
            ys = torch.cat(
                [torch.arange(N).repeat_interleave(K // parts), torch.arange(N).repeat_interleave(Q // parts)]
            )
            (sub.episode_loss(model(xs), ys) / (parts * x.shape[0])).backward()
    return grads(model)


# ----------------------------------------------------------------------------- exactness, fp64


@pytest.mark.parametrize("micro", [1, 3, 4, 8], ids=lambda m: f"micro{m}")
def test_contrastive_exact_accumulation_equals_full_batch(micro):
    model, loss = tiny_clip(), ClipLoss()
    inputs, target = pairs(8)
    ref_value, ref = full_batch(model, loss, inputs, target)
    value, got = exact(model, loss, inputs, target, micro)
    assert abs(float(value - ref_value)) <= TOL
    assert max_diff(got, ref) <= TOL
    assert float(ref["logit_scale"].abs()) > 0 and all(float(g.abs().max()) > 0 for g in ref.values())


@pytest.mark.parametrize("micro", [1, 2, 4, 12], ids=lambda m: f"micro{m}")
def test_episodic_exact_accumulation_equals_full_batch(micro):
    model, loss = tiny_proto(), PrototypicalLoss(3, 2, 4, vic_weight=0.5)
    x, y = episodes(2)
    ref_value, ref = full_batch(model, loss, x, y)
    value, got = exact(model, loss, x, y, micro)
    assert abs(float(value - ref_value)) <= TOL
    assert max_diff(got, ref) <= TOL
    assert all(float(g.abs().max()) > 0 for g in ref.values())


def test_naive_split_differs_from_full_batch():
    model, loss = tiny_clip(), ClipLoss()
    inputs, target = pairs(8)
    _, ref = full_batch(model, loss, inputs, target)
    naive = naive_clip(model, inputs, 4)
    assert max_diff(naive, ref) > 1e-3 * max(float(g.abs().max()) for g in ref.values())
    model, loss = tiny_proto(), PrototypicalLoss(3, 2, 4, vic_weight=0.5)
    x, y = episodes(2)
    _, ref = full_batch(model, loss, x, y)
    naive = naive_episodes(model, loss, x, y, 2)
    assert max_diff(naive, ref) > 1e-3 * max(float(g.abs().max()) for g in ref.values())


def test_dropout_masks_of_the_rerun_are_those_of_the_cached_pass():
    # the reference draws each micro-batch's masks in order from the same RNG state, with a graph
    model, loss, micro = tiny_clip(dropout=0.3), ClipLoss(), 3
    model.train()
    (img, tok), target = pairs(8)
    torch.manual_seed(5)
    outs = [model(img[s : s + micro], tok[s : s + micro]) for s in range(0, 8, micro)]
    ref_value = clip_loss(torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), outs[0][2])
    model.zero_grad(set_to_none=True)
    ref_value.backward()
    ref, ref_rng = grads(model), torch.get_rng_state()
    torch.manual_seed(5)
    value, got = exact(model, loss, (img, tok), target, micro)
    assert abs(float(value - ref_value.detach())) <= TOL and max_diff(got, ref) <= TOL
    assert torch.equal(torch.get_rng_state(), ref_rng)  # the stream continues as if run once
    torch.manual_seed(6)
    _, other = exact(model, loss, (img, tok), target, micro)
    assert max_diff(other, ref) > 1e-4  # dropout is really on


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_exact_accumulation_within_the_precisions_own_error(amp):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    model, loss = tiny_clip(dtype=torch.float32), ClipLoss()
    inputs, target = pairs(8, dtype=torch.float32)
    _, ref32 = full_batch(model, loss, inputs, target)
    # PyTorch's own error at this precision: the whole batch's forward under autocast, the loss
    # in fp32 from its low-precision embeddings (as open_clip computes it)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype):
        out = model(*inputs)
    loss.batch_loss(out, target).backward()
    full_lp = grads(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=amp == "fp16")
    _, got = exact(model, loss, inputs, target, 3, amp_dtype=dtype, scale=scaler.scale)
    if amp == "fp16":
        got = {k: g / 2.0**10 for k, g in got.items()}  # what GradScaler.unscale_ does
    eps = torch.finfo(dtype).eps
    for k in ref32:
        err_ours = float((got[k] - ref32[k]).abs().max())
        err_torch = float((full_lp[k] - ref32[k]).abs().max())
        # at most 3x PyTorch's own error at this precision, or one rounding of the largest value
        # (a scalar's error under bf16 is luck: one rounding either way)
        assert err_ours <= max(3 * err_torch, eps * float(ref32[k].abs().max())), (k, err_ours, err_torch)


def test_open_clip_model_exact_accumulation():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.create_model(
        "ViT-B-32",
        pretrained=None,
        embed_dim=16,
        vision_cfg={"image_size": 8, "layers": 1, "width": 32, "patch_size": 4, "head_width": 16},
        text_cfg={"context_length": 5, "vocab_size": EOT + 1, "width": 32, "heads": 2, "layers": 1},
    ).double()
    loss = ClipLoss()
    inputs, target = pairs(8)
    ref_value, ref = full_batch(model, loss, inputs, target)
    value, got = exact(model, loss, inputs, target, 3)
    assert abs(float(value - ref_value)) <= TOL and max_diff(got, ref) <= TOL


# ----------------------------------------------------------------------------- the trainer's interface


class PairSet(torch.utils.data.Dataset):
    def __init__(self, n, poison=False):
        (self.img, self.tok), self.y = pairs(n)
        self.poison = poison

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        if self.poison:
            raise AssertionError("data read before the configuration was checked")
        return (self.img[i], self.tok[i]), int(self.y[i])


def tcfg(**kw):
    base = dict(
        epochs=1,
        effective_batch=8,
        micro_batch=3,
        base_lr=0.5,
        warmup_epochs=0.0,
        clip_grad=None,
        weight_decay=0.0,
        progress=False,
        seed=3,
    )
    base.update(kw)
    return C.TrainConfig(**base)


def test_trainer_takes_the_coupled_path_by_interface_only():
    data = PairSet(8)
    model = tiny_clip()
    t = Trainer(model, ClipLoss(), data, None, tcfg())
    assert t.coupled
    seen = {}
    real_step = t.optimizer.step
    t.optimizer.step = lambda *a, **k: (seen.update(grads(model)), real_step(*a, **k))[1]
    t.train_step(((data.img, data.tok), data.y), 8)
    ref_model = tiny_clip()
    _, ref = full_batch(ref_model, ClipLoss(), (data.img, data.tok), data.y)
    assert max_diff(seen, ref) <= TOL

    class LooksCoupled:  # has batch_loss but does not declare the interface: a per-sample loss
        def batch_loss(self, outputs, target):
            raise AssertionError

        def __call__(self, outputs, target):
            return clip_loss(*outputs)

    assert not Trainer(tiny_clip(), LooksCoupled(), data, None, tcfg()).coupled
    assert isinstance(ClipLoss(), CoupledLoss) and isinstance(PrototypicalLoss(2, 1, 1), CoupledLoss)


def test_refusals_before_any_work():
    poisoned = PairSet(9, poison=True)
    with pytest.raises(ValueError, match=r"train\.effective_batch must be >= 2 .*contrastive"):
        Trainer(tiny_clip(), ClipLoss(), poisoned, None, tcfg(effective_batch=1, micro_batch=1))
    with pytest.raises(ValueError, match=r"train\.effective_batch: 9 samples in batches of 4 leave a last batch of 1"):
        Trainer(tiny_clip(), ClipLoss(), poisoned, None, tcfg(effective_batch=4, micro_batch=2))
    with pytest.raises(ValueError, match=r"batch: a contrastive loss needs at least 2 samples, got 1"):
        cached_backward(tiny_clip(), ClipLoss(), *pairs(1), 1)
    with pytest.raises(ValueError, match=r"train\.micro_batch: 'auto' is not supported"):
        Trainer(tiny_clip(), ClipLoss(), poisoned, None, tcfg(micro_batch="auto"))
    episodic = PrototypicalLoss(5, 5, 15)
    with pytest.raises(
        ValueError,
        match=r"train\.micro_batch \(7\) must divide the episode's query set "
        r"\(n_way \* q_query = 5 \* 15 = 75\)",
    ):
        Trainer(tiny_proto(), episodic, poisoned, None, tcfg(effective_batch=1, micro_batch=7))
    bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten())
    with pytest.raises(ValueError, match=r"model: 1 is a BatchNorm2d.*without BatchNorm"):
        Trainer(bn, episodic, poisoned, None, tcfg(effective_batch=1, micro_batch=25))


def test_episode_sampler():
    from dcal.train.data import SyntheticFewShot

    base = SyntheticFewShot(num_classes=6, per_class=7, img_size=12, cell=3)
    with pytest.raises(
        ValueError, match=r"k_shot \+ q_query = 5 \+ 3 = 8 samples per class, but class \d holds only 7"
    ):
        Episodes(base, n_way=3, k_shot=5, q_query=3, episodes=4)
    with pytest.raises(ValueError, match=r"n_way \(7\) exceeds the number of classes in the dataset \(6\)"):
        Episodes(base, n_way=7, k_shot=1, q_query=1, episodes=4)
    ep = Episodes(base, n_way=3, k_shot=2, q_query=4, episodes=5, seed=1)
    x, y = ep[0]
    assert x.shape == (18, 3, 12, 12) and y.tolist() == [0, 0, 1, 1, 2, 2] + [0] * 4 + [1] * 4 + [2] * 4
    idx = ep.indices(0)
    labels = torch.tensor(base.labels)
    assert idx.shape == (3, 6) and len(set(idx.flatten().tolist())) == 18  # distinct samples
    assert all(len(set(labels[row].tolist())) == 1 for row in idx)  # one class per way
    assert len({int(labels[row[0]]) for row in idx}) == 3
    assert torch.equal(ep.indices(0), idx)  # a function of (seed, epoch, index)
    ep.set_epoch(1)
    assert not torch.equal(ep.indices(0), idx)


# ----------------------------------------------------------------------------- DDP


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EpisodeSet(torch.utils.data.Dataset):
    def __init__(self, E):
        self.x, self.y = episodes(E)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _trainer_grads(trainer, batch, n_group):
    """The gradient the trainer hands to the optimiser (after DDP's reduction) for one step."""
    seen = {}
    real_step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (seen.update(grads(trainer.model)), real_step(*a, **k))[1]
    r = trainer.train_step(batch, n_group)
    return r["loss"], seen


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(
        WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        results = {}
        # contrastive: the global batch of 8 pairs, 4 per process as DistributedSampler deals them
        data = PairSet(8)
        t = Trainer(tiny_clip(), ClipLoss(), data, None, tcfg(effective_batch=8, micro_batch=3))
        assert t.world == 2 and t.ddp is not None
        mine = slice(rank, None, world)
        results["clip"] = _trainer_grads(t, ((data.img[mine], data.tok[mine]), data.y[mine]), 8)
        # episodic: 2 episodes, one per process; DDP's mean over processes is the mean over episodes
        eps = EpisodeSet(2)
        t = Trainer(
            tiny_proto(), PrototypicalLoss(3, 2, 4, vic_weight=0.5), eps, None, tcfg(effective_batch=2, micro_batch=4)
        )
        results["episodes"] = _trainer_grads(t, (eps.x[rank : rank + 1], eps.y[rank : rank + 1]), 2)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ddp_two_gloo_processes_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    _, clip_ref = full_batch(tiny_clip(), ClipLoss(), *pairs(8))
    _, ep_ref = full_batch(tiny_proto(), PrototypicalLoss(3, 2, 4, vic_weight=0.5), *episodes(2))
    for r in (r0, r1):
        assert max_diff(r["clip"][1], clip_ref) <= TOL
        assert max_diff(r["episodes"][1], ep_ref) <= TOL
    ref_value = float(clip_loss(*tiny_clip()(*pairs(8)[0])))
    # a gathering loss is the global batch's on every process
    assert abs(r0["clip"][0] - ref_value) <= TOL and r0["clip"][0] == r1["clip"][0]


# ----------------------------------------------------------------------------- the demos, tiny


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP_SMOKE = [
    "--set",
    "data.train_size=66",
    "--set",
    "data.val_size=24",
    "--set",
    "train.effective_batch=16",
    "--set",
    "train.micro_batch=6",
    "--set",
    "model.vision_depth=1",
    "--set",
    "model.text_depth=1",
    "--set",
    "train.epochs=1",
    "--set",
    "train.progress=false",
]
FEWSHOT_SMOKE = [
    "--set",
    "data.episodes_per_epoch=4",
    "--set",
    "data.val_episodes=2",
    "--set",
    "model.hidden=16",
    "--set",
    "train.epochs=1",
    "--set",
    "train.progress=false",
]


def _rows(out):
    import json

    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.parametrize(
    "config, args", [("clip_demo.yaml", CLIP_SMOKE), ("fewshot_demo.yaml", FEWSHOT_SMOKE)], ids=["clip", "fewshot"]
)
def test_demo_config_smoke(tmp_path, config, args):
    from dcal.train.__main__ import main

    n = torch.get_num_threads()
    try:
        assert main(["--config", os.path.join(ROOT, "configs", config), "--out", str(tmp_path), *args]) == 0
    finally:
        torch.set_num_threads(n)
    (row,) = _rows(str(tmp_path))
    assert 0.0 <= row["val_acc"] <= 1.0 and row["step"] >= 2 and row["train_loss"] > 0
    assert os.listdir(tmp_path / "checkpoints")


def test_open_clip_config_smoke(tmp_path):
    pytest.importorskip("open_clip")
    import yaml

    from dcal.train.__main__ import main

    cfg = {
        "model": {
            "name": "open_clip",
            "arch": "ViT-B-32",
            "embed_dim": 16,
            "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
            "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        },
        "data": {"name": "synthetic_captions", "img_size": 16, "train_size": 34, "val_size": 12},
        "train": {"epochs": 1, "effective_batch": 8, "micro_batch": 3, "progress": False, "threads": 1},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    n = torch.get_num_threads()
    try:
        assert main(["--config", str(path), "--out", str(tmp_path / "o")]) == 0
    finally:
        torch.set_num_threads(n)
    (row,) = _rows(str(tmp_path / "o"))
    assert row["step"] == 5 and 0.0 <= row["val_acc"] <= 1.0


def test_coupled_resume_is_exact(tmp_path):
    from dcal.train.__main__ import main

    cfg = os.path.join(ROOT, "configs", "fewshot_demo.yaml")
    args = [*FEWSHOT_SMOKE, "--set", "train.epochs=2", "--set", "data.per_class=20", "--set", "model.depth=2"]
    n = torch.get_num_threads()
    try:
        assert main(["--config", cfg, "--out", str(tmp_path / "a"), *args]) == 0
        assert main(["--config", cfg, "--out", str(tmp_path / "b"), *args, "--set", "train.max_steps=3"]) == 0
        assert main(["--config", cfg, "--out", str(tmp_path / "b"), *args, "--resume"]) == 0
    finally:
        torch.set_num_threads(n)
    a, b = (
        torch.load(sorted((tmp_path / d / "checkpoints").glob("step-*.pt"))[-1], weights_only=True) for d in ("a", "b")
    )
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert _rows(str(tmp_path / "a"))[-1]["val_acc"] == _rows(str(tmp_path / "b"))[-1]["val_acc"]


def test_bench_accumulation_differences():
    from bench.accumulation import differences

    for case in ("contrastive", "episodic"):
        d = differences(case)
        assert d["exact"]["loss_diff"] <= TOL and d["exact"]["grad_diff"] <= TOL, (case, d)
        assert d["naive"]["grad_rel"] > 1e-2 and d["naive"]["loss_diff"] > 1e-3, (case, d)
