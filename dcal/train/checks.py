"""Checks across keys of a config, run before any work (each key's own value is checked where it
is read: :mod:`dcal.train.config` for ``train``, the builders of :mod:`dcal.train.build` for
``model`` and ``data``, which also compare ``model.img_size`` / ``model.num_classes`` with the
data's). Each failure is one ValueError naming the keys."""

from __future__ import annotations

import os


def check_train(cfg, task=None, world: int = 1) -> None:
    """``train`` against itself and the data: warmup within the run, the lr floor below the peak;
    with the ``task`` (built first), the micro-batch within the per-process batch (for per-sample
    losses; a coupled loss counts rows per forward and checks itself) and a batch the training
    set can fill."""
    t = cfg.train
    from dcal.train.coupled import CoupledLoss

    coupled = task is not None and isinstance(task.loss, CoupledLoss)
    if task is not None and isinstance(t.micro_batch, int) and not coupled:
        local = t.effective_batch // max(1, world)
        if t.micro_batch > local:
            raise ValueError(
                f"train.micro_batch ({t.micro_batch}) exceeds train.effective_batch ({t.effective_batch}"
                f"{f' over {world} processes' if world > 1 else ''}): a micro-batch is a part of "
                f"the batch; lower train.micro_batch or raise train.effective_batch"
            )
    if t.warmup_epochs > t.epochs:
        raise ValueError(
            f"train.warmup_epochs ({t.warmup_epochs}) exceeds train.epochs ({t.epochs}): the lr would "
            f"never reach its peak"
        )
    peak = t.base_lr * t.effective_batch / 512
    if t.min_lr > peak:
        raise ValueError(
            f"train.min_lr ({t.min_lr:g}) exceeds the peak lr ({peak:g} = train.base_lr {t.base_lr:g} "
            f"* train.effective_batch {t.effective_batch} / 512)"
        )
    if task is not None and not coupled:
        tc, vc = getattr(task.train_set, "classes", None), getattr(task.val_set, "classes", None)
        if tc is not None and vc is not None and list(tc) != list(vc):
            only_t, only_v = sorted(set(tc) - set(vc)), sorted(set(vc) - set(tc))
            what = (
                "; ".join(
                    p
                    for p in (
                        f"only in training: {only_t[:5]}" if only_t else "",
                        f"only in validation: {only_v[:5]}" if only_v else "",
                    )
                    if p
                )
                or "another order"
            )
            key = "data.root" if "root" in cfg.data else f"data.name {cfg.data['name']!r}"
            raise ValueError(
                f"{key}: the validation set's {len(vc)} classes are not the training set's {len(tc)} "
                f"({what}); labels would not match"
            )
        try:
            n = len(task.train_set)
        except TypeError:
            n = None
        if n is not None and n < t.effective_batch:
            raise ValueError(
                f"train.effective_batch ({t.effective_batch}) exceeds the {n} training samples of "
                f"data.name {cfg.data['name']!r}"
            )


def check_cli(args) -> None:
    """Combinations of command-line flags."""
    if args.eval_only:
        if not args.checkpoint:
            raise ValueError("--eval-only needs --checkpoint PATH (the checkpoint to evaluate)")
        if args.resume is not None:
            raise ValueError("--eval-only does not train: drop --resume")
        if args.overwrite:
            raise ValueError("--eval-only writes no run: drop --overwrite")
        if not os.path.isfile(args.checkpoint):
            raise ValueError(f"--checkpoint {args.checkpoint} does not exist")
        return
    if args.checkpoint:
        raise ValueError("--checkpoint is for --eval-only; to continue training from a checkpoint use --resume PATH")
    if not args.out:
        raise ValueError("--out DIR is required to train (metrics, checkpoints and the config go there)")
    if args.resume is not None and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite moves it aside: give one of them")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file, expected a folder")
