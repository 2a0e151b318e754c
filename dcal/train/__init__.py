"""Training loop of dcal: micro-batches with exact accumulation, AMP, DDP, checkpoints, configs and a CLI
(docs/contract.md, Training).

Command line (runs unchanged under ``torchrun --nproc_per_node N -m dcal.train ...``)::

    python -m dcal.train --config configs/demo.yaml --out runs/demo
    python -m dcal.train --config configs/cub_vitb16_448.yaml --set data.root=/data/CUB_200_2011 \
        --max-memory 16GB --out runs/cub
    python -m dcal.train --config configs/demo.yaml --out runs/demo --resume     # latest checkpoint
    python -m dcal.train --config configs/demo.yaml --eval-only --checkpoint runs/demo/checkpoints/best.pt

``DIR/metrics.jsonl``: one JSON object per evaluation (``epoch``, ``step``, ``train_loss``,
``val_acc``, ``peak_mem_mb``, ``effective_batch``, ``micro_batch``, ``lr``, ``skipped_steps``, ...);
``DIR/steps.jsonl``: one per optimiser step; ``DIR/checkpoints/``: ``step-<N>.pt`` (last
``keep_last``) and ``best.pt``; ``DIR/config.yaml``: the resolved config.

Configs have three sections (see :mod:`dcal.train.config`): ``model`` (``name``: a key of
:data:`dcal.train.build.MODEL_BUILDERS`; other keys go to the model; ``pretrained: PATH`` starts
from timm, JAX ``.npz`` or Hugging Face ViT weights, :mod:`dcal.train.pretrained`), ``data``
(``name``: a key of :data:`dcal.train.build.DATA_BUILDERS`: ``synthetic``, ``folder``, ``cub``,
``cars``, ``aircraft``, ``bev_synthetic``, ...) and ``train``
(:class:`TrainConfig`). Unknown keys, bad values and keys that contradict each other stop the
run before any work with one line naming the key (exit status 2). One run per ``--out`` folder
(:mod:`dcal.train.rundir`).

In Python, :class:`Trainer` takes any model, loss and datasets::

    Trainer(model, loss_fn, train_set, val_set, TrainConfig(effective_batch=64, micro_batch=16,
            amp="bf16"), out_dir="runs/x").fit()

Losses that couple the samples of a batch declare it by subclassing
:class:`dcal.train.coupled.CoupledLoss` (:class:`ClipLoss`: contrastive, negatives from the whole
batch and every process; :class:`PrototypicalLoss`: episodes with a VIC regulariser); the trainer
then accumulates them exactly with an embedding cache (:mod:`dcal.train.coupled`)::

    python -m dcal.train --config configs/clip_demo.yaml --out runs/clip          # CLIP, zero-shot val_acc
    python -m dcal.train --config configs/fewshot_demo.yaml --out runs/fewshot    # 5-way 5-shot episodes

``python -m dcal.train.autobatch --config C --micro-batch 8,16,32 --measure`` prints a table of the predicted
and measured (CPU, peak RSS) memory of a training step per micro-batch.
"""

from dcal.train.config import Config, TrainConfig, load as load_config, parse_bytes
from dcal.train.coupled import ClipLoss, CoupledLoss, PrototypicalLoss, cached_backward
from dcal.train.episodes import Episodes
from dcal.train.trainer import CosineWarmup, Trainer, accuracy, param_groups, setup_distributed

__all__ = [
    "Config",
    "TrainConfig",
    "load_config",
    "parse_bytes",
    "Trainer",
    "CosineWarmup",
    "accuracy",
    "param_groups",
    "setup_distributed",
    "CoupledLoss",
    "ClipLoss",
    "PrototypicalLoss",
    "cached_backward",
    "Episodes",
]
