"""``python -m dcal.train --config configs/<name>.yaml [--set section.key=value ...] --out DIR``

Trains the config's model on its data; ``DIR/metrics.jsonl`` gets one JSON object per
evaluation, ``DIR/checkpoints/`` the checkpoints, ``DIR/config.yaml`` the resolved config.
Runs unchanged under ``torchrun --nproc_per_node N -m dcal.train ...`` (DDP).

One run per folder: a ``DIR`` holding another run is refused unless ``--resume`` (continue it;
the saved config must build the same model and data) or ``--overwrite`` (move it aside to
``DIR.old-<time>``). ``--eval-only --checkpoint P`` evaluates a checkpoint (top-1, top-5,
per-class accuracy) without training. Every mistake in the config or the command line stops the
run before any work with one line naming the key and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the usage too)
        print(f"error: {message} (see python -m dcal.train --help)", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m dcal.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML file with model, data and train sections")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=3 (repeatable)",
    )
    p.add_argument("--out", default=None, help="output directory (metrics.jsonl, checkpoints/); required to train")
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        help="continue from a checkpoint path, or from the latest one in --out when no path is given",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="--out holds another run: move it aside to OUT.old-<time> (nothing is deleted) and start anew",
    )
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="evaluate --checkpoint on the validation set (top-1, top-5, per-class CSV); no training",
    )
    p.add_argument("--checkpoint", default=None, help="the checkpoint --eval-only evaluates")
    p.add_argument(
        "--max-memory",
        default=None,
        help="budget of the process's peak memory, e.g. 16GB, 200MB, 512MiB: the peak resident set (RSS) "
        "on CPU, torch.cuda.max_memory_allocated on GPU; picks the micro-batch when it is 'auto', "
        "refuses a fixed one predicted above it (same as --set train.max_memory=...)",
    )
    p.add_argument(
        "--micro-batch", default=None, help="micro-batch size or 'auto' (same as --set train.micro_batch=...)"
    )
    return p


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = _parser().parse_args(argv)

    from dcal.train import config as C
    from dcal.train.checks import check_cli

    overrides = list(args.set)
    try:
        C.parse_bytes(args.max_memory, "--max-memory")
    except ValueError as e:
        return _err(str(e))
    if args.max_memory is not None:
        overrides.append(f"train.max_memory={args.max_memory}")
    if args.micro_batch is not None:
        overrides.append(f"train.micro_batch={args.micro_batch}")
    try:
        check_cli(args)
        cfg = C.load(args.config, overrides)
    except ValueError as e:
        return _err(str(e))

    if args.eval_only:
        from dcal.train.evaluate import evaluate_checkpoint

        try:
            evaluate_checkpoint(cfg, args.checkpoint, out=args.out, log=print)
        except ValueError as e:
            return _err(str(e))
        return 0

    import torch

    from dcal.train import rundir
    from dcal.train.build import build_task
    from dcal.train.checkpoint import CheckpointDir
    from dcal.train.checkpoint import load as load_checkpoint
    from dcal.train.checks import check_train
    from dcal.train.pretrained import load_pretrained
    from dcal.train.trainer import Trainer, setup_distributed

    rank, world, _ = setup_distributed()

    def info(msg):
        if rank == 0:
            print(msg, file=sys.stderr)

    aside, resume, state = None, args.resume, None
    try:
        if resume is None:
            aside = rundir.check_new_run(args.out, args.overwrite)
        elif resume == "auto":
            # the newest checkpoint that reads; a truncated one (full disk, copy cut short) is skipped
            ckdir = CheckpointDir(args.out)
            found = ckdir.list()
            resume, state = ckdir.latest_readable(warn=info)
            if resume is None:
                what = f"none of the {len(found)} checkpoints" if found else "no checkpoint"
                raise ValueError(
                    f"--resume: {what} in {ckdir.dir} can be read; to start fresh, run again without "
                    f"--resume (or with a new --out)"
                )
        else:
            rundir.check_resume_target(args.out, resume)
            try:
                state = load_checkpoint(resume)
            except ValueError as e:
                raise ValueError(f"--resume: {e}") from None
        changed = []
        if state is not None:
            changed = rundir.check_resume(state.get("config"), cfg.to_dict(), resume)
            if rundir.finished(state, cfg.train):
                if rank == 0:
                    print(rundir.finished_message(args.out, state, cfg.train))
                return 0
        check_train(cfg, None, world)
        torch.manual_seed(cfg.train.seed)
        task = build_task(cfg, seed=cfg.train.seed, weights_from_checkpoint=state is not None)
        check_train(cfg, task, world)
        torch.manual_seed(cfg.train.seed)
        model = task.model_factory()
        report = None
        if task.pretrained is not None and state is None:
            report = load_pretrained(model, task.pretrained)
        loss = task.loss if task.loss is not None else model.loss
        trainer = Trainer(
            model,
            loss,
            task.train_set,
            task.val_set,
            cfg.train,
            out_dir=args.out,
            model_factory=task.model_factory,
            run_config=cfg.to_dict(),
            eval_fn=task.eval_fn,
        )
        trainer.plan_memory()  # a budget that cannot be met stops here, before anything is written
    except ValueError as e:
        return _err(str(e))
    # every check passed: only now is anything moved or written
    if aside is not None and rank == 0:
        rundir.move_aside(args.out, aside)
        info(f"moved the previous run in {args.out} aside to {aside}")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if changed:
        info(f"resuming with changed settings: {'; '.join(changed)}")
    if task.pretrained is not None:
        info(
            report
            if report is not None
            else f"pretrained: not loaded ({task.pretrained}): the weights come from {resume}"
        )
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
