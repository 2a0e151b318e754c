"""FSDP2 on 2 gloo CPU processes (one torch.multiprocessing spawn for every case, to stay fast):

* a tiny DCALViT (SA + GLCA + PWCA with a fixed pairing that stays within each process's half)
  sharded per block: the loss and every parameter gradient equal one process on the whole batch
  (fp32, 1e-5), with activation checkpointing none / full / selective; selective checkpointing
  does not rerun the ``dcal::`` ops in backward, full does;
* ``Trainer`` with ``train.strategy: fsdp`` (gradient accumulation, sharded checkpoints): the epoch
  loss equals a one-process trainer's, and a run resumed from its step-2 checkpoint ends with
  exactly the parameters of the uninterrupted run;
* a bias parameter in another dtype than q (bf16 parameter policy, fp16 autocast): its gradient
  comes back in the parameter's dtype and equals an fp64 computation.
"""

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dcal.models import DCALViT
from dcal.models.dcal_vit import DCALConfig

WORLD = 2
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _vit(ablation="full"):
    torch.manual_seed(0)
    return DCALViT(
        DCALConfig(
            img_size=32,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=2,
            num_classes=5,
            drop_path_rate=0.0,
            ablation=ablation,
        )
    )


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)


class Images(torch.utils.data.Dataset):
    def __init__(self, n=16, seed=3):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 5, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _train_cfg(**kw):
    from dcal.train.config import TrainConfig

    base = dict(
        epochs=2,
        effective_batch=8,
        micro_batch=2,
        base_lr=0.05,
        warmup_epochs=0.0,
        progress=False,
        threads=1,
        clip_grad=1.0,
    )
    base.update(kw)
    return TrainConfig(**base)


def _full_params(model):
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()
    }


class _CountDcalOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "dcal" and "bwd" not in func.__name__:
            self.n += 1
        return func(*args, **(kwargs or {}))


class TinyNA(nn.Module):
    """One neighborhood-attention block with a relative position bias, for the dtype case."""

    def __init__(self):
        super().__init__()
        from dcal.nn import NeighborhoodAttention2D

        torch.manual_seed(7)
        self.blocks = nn.ModuleList([NeighborhoodAttention2D(32, 2, 3, border="clamp")])
        with torch.no_grad():
            self.blocks[0].rpb.normal_()

    def forward(self, x):
        return self.blocks[0](x)


# ----------------------------------------------------------------------------- worker


def _gradients_case(rank, res):
    from dcal.train import distributed as D

    x, y = _batch()
    ref = _vit()
    out = ref(x, perm=torch.tensor([1, 0, 3, 2]))  # pairs stay within each process's half
    loss_ref, _ = ref.loss(out, y)
    loss_ref.backward()
    grads_ref = {n: p.grad for n, p in ref.named_parameters()}
    mine = slice(2 * rank, 2 * rank + 2)
    for mode in ("none", "full", "selective"):
        model = D.shard_model(_vit(), checkpointing=mode)
        out = model(x[mine], perm=torch.tensor([1, 0]))
        loss, _ = model.loss(out, y[mine])  # a registered FSDP forward method
        with _CountDcalOps() as count:
            loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        res[f"grad_{mode}"] = {
            "loss": float(total) / WORLD,
            "loss_ref": float(loss_ref.detach()),
            "recomputed_dcal_ops": count.n,
            "max_diff": {n: float((grads[n] - grads_ref[n]).abs().max()) for n in grads_ref},
            "missing": sorted(set(grads_ref) - set(grads)),
            "sharded": type(model).__name__,
        }


def _trainer_case(rank, tmp, res):
    from dcal.train.trainer import Trainer

    # uninterrupted run (sharded checkpoints at steps 2 and 4), then one resumed from step 2
    model = _vit("sa_glca")
    t = Trainer(
        model,
        model.loss,
        Images(),
        Images(8, seed=4),
        _train_cfg(strategy="fsdp", save_every_steps=2),
        out_dir=os.path.join(tmp, "a"),
    )
    hist = t.fit()
    final = _full_params(t.model)
    model_b = _vit("sa_glca")
    with torch.no_grad():  # different starting weights: the resume must overwrite them
        for p in model_b.parameters():
            p.add_(1.0)
    t_b = Trainer(
        model_b, model_b.loss, Images(), Images(8, seed=4), _train_cfg(strategy="fsdp"), out_dir=os.path.join(tmp, "b")
    )
    hist_b = t_b.fit(resume=os.path.join(tmp, "a", "checkpoints", "step-00000002.pt"))
    resumed = _full_params(t_b.model)
    if rank == 0:
        res["trainer"] = {
            "hist": hist,
            "hist_b": hist_b,
            "final": final,
            "resume_equal": {n: bool(torch.equal(final[n], resumed[n])) for n in final},
            "files": sorted(os.listdir(os.path.join(tmp, "a", "checkpoints"))),
        }


def _bias_dtype_case(rank, res):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    x = torch.randn(2, 6, 7, 32, generator=torch.Generator().manual_seed(5))
    ref = TinyNA().double()
    ref(x.double()).square().sum().backward()
    model = TinyNA()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fully_shard(model.blocks[0], mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    seen = {}

    def record(mod, inputs, output):
        seen["q"] = output.dtype

    def record_rpb(mod, inputs):  # after FSDP's own pre-forward hook: the gathered parameter
        seen["rpb_in_forward"] = mod.rpb.dtype

    model.blocks[0].qkv.register_forward_hook(record)
    model.blocks[0].register_forward_pre_hook(record_rpb)
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(x)
    out.float().square().sum().backward()
    rpb = model.blocks[0].rpb
    g = rpb.grad.full_tensor()
    want = ref.blocks[0].rpb.grad.float()  # the same x on both processes: FSDP's mean is one process's
    res["bias"] = {
        "q_dtype": str(seen["q"]),
        "rpb_dtype_in_forward": str(seen["rpb_in_forward"]),
        "param_dtype": str(rpb.dtype),
        "grad_dtype": str(rpb.grad.dtype),
        "rel_err": float((g - want).norm() / want.norm()),
    }


def _worker(rank, port, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    res = {}
    try:
        _gradients_case(rank, res)
        _bias_dtype_case(rank, res)
        _trainer_case(rank, tmp, res)
    finally:
        torch.save(res, os.path.join(tmp, f"res-{rank}.pt"))
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("fsdp"))
    mp.spawn(_worker, args=(_free_port(), tmp), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(tmp, f"res-{r}.pt"), weights_only=False) for r in range(WORLD)]


# ----------------------------------------------------------------------------- checks


@pytest.mark.parametrize("mode", ["none", "full", "selective"])
def test_loss_and_every_gradient_equal_one_process(results, mode):
    for rank, res in enumerate(results):
        r = res[f"grad_{mode}"]
        assert r["sharded"].startswith("FSDP")
        assert not r["missing"], f"parameters without gradient under FSDP: {r['missing']}"
        assert abs(r["loss"] - r["loss_ref"]) <= 1e-5 * max(1.0, abs(r["loss_ref"]))
        worst = max(r["max_diff"].items(), key=lambda kv: kv[1])
        assert worst[1] <= 1e-5, f"rank {rank}, checkpointing {mode}: gradient of {worst[0]} off by {worst[1]}"


def test_selective_checkpointing_saves_the_dcal_ops(results):
    for res in results:
        assert res["grad_none"]["recomputed_dcal_ops"] == 0
        assert res["grad_full"]["recomputed_dcal_ops"] > 0, "full checkpointing recomputes the attention"
        assert res["grad_selective"]["recomputed_dcal_ops"] == 0, "the save list keeps dcal:: outputs"


def test_bias_gradient_in_the_bias_dtype(results):
    for res in results:
        b = res["bias"]
        assert b["q_dtype"] == "torch.float16" and b["rpb_dtype_in_forward"] == "torch.bfloat16", b
        assert b["param_dtype"] == b["grad_dtype"] == "torch.float32", b
        assert b["rel_err"] < 2e-2, b  # fp16 / bf16 compute against fp64


def test_trainer_fsdp_equals_one_process_and_resumes_exactly(results, tmp_path):
    from dcal.train.trainer import Trainer

    r = results[0]["trainer"]
    assert all(r["resume_equal"].values()), [n for n, ok in r["resume_equal"].items() if not ok]
    assert "step-00000002.pt" in r["files"] and "step-00000002.dcp" in r["files"], r["files"]
    assert not any(f.endswith(".tmp") for f in r["files"]), r["files"]
    assert [h["train_loss"] for h in r["hist_b"]] == [r["hist"][-1]["train_loss"]]
    # the same training in one process (DistributedSampler groups: the same samples per step)
    model = _vit("sa_glca")
    one = Trainer(model, model.loss, Images(), Images(8, seed=4), _train_cfg(), out_dir=str(tmp_path))
    hist = one.fit()
    for a, b in zip(hist, r["hist"]):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-5, (a, b)
        assert a["val_acc"] == b["val_acc"]
    for n, p in model.named_parameters():
        torch.testing.assert_close(r["final"][n], p.detach(), atol=1e-5, rtol=1e-5, msg=lambda m: f"{n}: {m}")


def test_config_refusals():
    from dcal.train.config import TrainConfig

    for kw, key in [
        (dict(strategy="zero"), "train.strategy"),
        (dict(strategy="fsdp", amp="fp16"), "train.amp"),
        (dict(strategy="fsdp", micro_batch="auto"), "train.micro_batch"),
        (dict(strategy="fsdp", micro_batch=2, grad_checkpointing=True), "train.grad_checkpointing"),
        (dict(strategy="fsdp", micro_batch=2, fsdp_checkpointing="some"), "train.fsdp_checkpointing"),
        (dict(fsdp_param_dtype="bf16"), "train.strategy"),
    ]:
        with pytest.raises(ValueError, match=key):
            TrainConfig(**kw).validate()


def test_shard_model_needs_a_process_group():
    from dcal.train import distributed as D

    if dist.is_initialized():  # pragma: no cover
        pytest.skip("a process group is already initialised here")
    with pytest.raises(ValueError, match="torchrun"):
        D.shard_model(copy.deepcopy(_vit()))


def test_trainer_refuses_fsdp_with_a_coupled_loss():
    from dcal.train.coupled import ClipLoss
    from dcal.train.trainer import Trainer

    model = _vit("sa")
    with pytest.raises(ValueError, match="train.strategy.*coupled loss ClipLoss"):
        Trainer(model, ClipLoss(), Images(), None, _train_cfg(strategy="fsdp"))
