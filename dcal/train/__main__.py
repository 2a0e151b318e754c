"""``python -m dcal.train --config configs/<name>.yaml [--set section.key=value ...] --out DIR``

Trains the config's model on its data; ``DIR/metrics.jsonl`` gets one JSON object per
evaluation, ``DIR/checkpoints/`` the checkpoints, ``DIR/config.yaml`` the resolved config.
Runs unchanged under ``torchrun --nproc_per_node N -m dcal.train ...`` (DDP).
"""
from __future__ import annotations

import argparse
import os
import sys

import yaml


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dcal.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML file with model, data and train sections")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    p.add_argument("--out", required=True, help="output directory (metrics.jsonl, checkpoints/)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint path, or from the latest one in --out when no path is given")
    p.add_argument("--max-memory", default=None,
                   help="budget of the process's peak memory, e.g. 16GB, 200MB, 512MiB: the peak resident set (RSS) "
                   "on CPU, torch.cuda.max_memory_allocated on GPU; picks the micro-batch when it is 'auto', "
                   "refuses a fixed one predicted above it (same as --set train.max_memory=...)")
    p.add_argument("--micro-batch", default=None, help="micro-batch size or 'auto' (same as --set train.micro_batch=...)")
    args = p.parse_args(argv)

    from dcal.train import config as C

    overrides = list(args.set)
    try:
        C.parse_bytes(args.max_memory, "--max-memory")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.max_memory is not None:
        overrides.append(f"train.max_memory={args.max_memory}")
    if args.micro_batch is not None:
        overrides.append(f"train.micro_batch={args.micro_batch}")
    try:
        cfg = C.load(args.config, overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import torch

    from dcal.train.build import build_task
    from dcal.train.checkpoint import CheckpointDir
    from dcal.train.checkpoint import load as load_checkpoint
    from dcal.train.trainer import Trainer, setup_distributed

    rank, _, _ = setup_distributed()
    try:
        torch.manual_seed(cfg.train.seed)
        task = build_task(cfg, seed=cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        model = task.model_factory()
        loss = task.loss if task.loss is not None else model.loss
        trainer = Trainer(model, loss, task.train_set, task.val_set, cfg.train, out_dir=args.out,
                          model_factory=task.model_factory, run_config=cfg.to_dict(), eval_fn=task.eval_fn)
        trainer.plan_memory()  # a budget that cannot be met stops here, before anything is written
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    resume, state = args.resume, None
    if resume == "auto":
        # the newest checkpoint that reads; a truncated one (full disk, copy cut short) is skipped
        ckdir = CheckpointDir(args.out)
        found = ckdir.list()
        resume, state = ckdir.latest_readable(warn=lambda m: print(m, file=sys.stderr) if rank == 0 else None)
        if resume is None:
            what = f"none of the {len(found)} checkpoints" if found else "no checkpoint"
            print(f"error: --resume: {what} in {ckdir.dir} can be read; to start fresh, run again without "
                  f"--resume (or with a new --out)", file=sys.stderr)
            return 2
    elif resume is not None:
        try:
            state = load_checkpoint(resume)
        except ValueError as e:
            print(f"error: --resume: {e}", file=sys.stderr)
            return 2
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    trainer.fit(resume=resume, resume_state=state)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
