"""The smallest training config the CLI tests run: an MLP on 44 synthetic 16x16 images, one epoch,
one thread (seconds per run). Shared by the training CLI, run-folder and config-error tests; copy
before changing it (``{**TINY_MLP, "data": {...}}``)."""

TINY_MLP = {
    "model": {"name": "mlp", "hidden": 16},
    "data": {"name": "synthetic", "img_size": 16, "num_classes": 4, "train_size": 44, "val_size": 20},
    "train": {
        "epochs": 1,
        "effective_batch": 8,
        "micro_batch": 2,
        "base_lr": 0.05,
        "progress": False,
        "threads": 1,
        "seed": 1,
    },
}
