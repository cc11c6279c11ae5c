"""Run by tests/test_ddp.py as its own program: Lightning's DDP launcher starts the second
process by running this file again, which a pytest process cannot be."""

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.data import FoldDataModule, split_fold  # noqa: E402
from pipeline.model import load_model  # noqa: E402
from pipeline.train import build_trainer, fold_dir, read_folds, train_all  # noqa: E402

if __name__ == "__main__":
    mode, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_config(None, overrides)
    if mode == "fit":
        train_all(cfg, [0])
    else:  # validate best.ckpt on fold 0 with every rank; rank 0 writes what was scored
        model = load_model(str(fold_dir(cfg, 0) / "best.ckpt"), cfg.model)
        trainer = build_trainer(cfg, fold_dir(cfg, 0) / "validate")
        trainer.validate(model, FoldDataModule(cfg, split_fold(read_folds(cfg), 0)), verbose=False)
        if trainer.is_global_zero:
            model.val_predictions.to_csv(Path(cfg.runs_dir) / "ddp_val.csv", index=False)
            pd.Series([trainer.world_size]).to_csv(Path(cfg.runs_dir) / "world.csv", index=False)
