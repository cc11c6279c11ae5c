"""The LightningModule: any timm backbone, one logit, smoothed pos-weighted BCE, AdamW + OneCycle per step."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict

import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from scipy.special import expit
from torch import nn

from pipeline.cli import UserError
from pipeline.config import ModelConfig, TrainConfig
from pipeline.metadata import N_FEATURES
from pipeline.metrics import safe_auc

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


def create_backbone(cfg: ModelConfig, num_classes: int = 1) -> nn.Module:
    """A timm model with a single-logit head (or pooled features with `num_classes=0`);
    local weights via `weights_path`, no hub at run time."""
    kwargs = {"num_classes": num_classes, "drop_rate": cfg.drop_rate, "drop_path_rate": cfg.drop_path_rate}
    pretrained = cfg.pretrained or cfg.weights_path is not None
    if cfg.weights_path:
        kwargs["pretrained_cfg_overlay"] = {"file": cfg.weights_path}
    try:
        return timm.create_model(cfg.backbone, pretrained=pretrained, **kwargs)
    except TypeError:
        # some tiny/test models take no drop_path_rate
        kwargs.pop("drop_path_rate")
        return timm.create_model(cfg.backbone, pretrained=pretrained, **kwargs)
    except (RuntimeError, OSError) as err:  # OSError: hub cache miss offline
        if not timm.is_model(cfg.backbone):
            raise UserError(f"model.backbone={cfg.backbone!r} is not a timm model") from None
        raise UserError(
            f"cannot load pretrained weights for {cfg.backbone!r} ({type(err).__name__}: "
            f"{str(err)[:200]}); download them once with HF_HUB_OFFLINE=0 (e.g. `make train-all "
            "HF_HUB_OFFLINE=0`), or set model.weights_path to a local file, or model.pretrained=false"
        ) from None


class MetaHead(nn.Module):
    """Pooled image features and the metadata vector (through a small MLP) → one logit."""

    def __init__(self, n_features: int, n_meta: int = N_FEATURES, hidden: int = 32, drop: float = 0.0):
        super().__init__()
        self.meta = nn.Sequential(nn.Linear(n_meta, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(n_features + hidden, 1)

    def forward(self, features: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        meta = self.meta(meta.to(features.dtype))
        return self.fc(self.drop(torch.cat([features, meta], dim=1)))


def smooth(targets: torch.Tensor, amount: float) -> torch.Tensor:
    """Label smoothing for a binary target: 0 → amount/2, 1 → 1 - amount/2."""
    return targets * (1 - amount) + 0.5 * amount


class MelanomaModel(pl.LightningModule):
    def __init__(self, model: dict, train: dict, fold: int = -1):
        super().__init__()
        # plain dicts: checkpoints then load without this project's classes being pickled
        self.save_hyperparameters()
        self.model_cfg = ModelConfig(**model)
        self.train_cfg = TrainConfig(**{k: v for k, v in train.items() if k != "aug"})
        meta = self.model_cfg.metadata
        self.net = create_backbone(self.model_cfg, num_classes=0 if meta else 1)
        self.meta_head = MetaHead(self.net.num_features, drop=self.model_cfg.drop_rate) if meta else None
        data_cfg = timm.data.resolve_data_config({}, model=self.net)
        self.register_buffer("mean", torch.tensor(data_cfg["mean"]).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(data_cfg["std"]).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pos_weight", torch.tensor([self.train_cfg.pos_weight]), persistent=False)
        self._val: list[tuple[torch.Tensor, ...]] = []
        self._first_bad: torch.Tensor | None = None
        self._lrs: dict[int, float] = {}
        self.skipped = 0

    @classmethod
    def from_configs(cls, model: ModelConfig, train: TrainConfig, fold: int = -1) -> MelanomaModel:
        return cls(asdict(model), asdict(train), fold)

    def setup(self, stage: str) -> None:
        if self.device.type == "cuda":
            self.net.to(memory_format=torch.channels_last)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, C) → normalised float (B, C, H, W), channels-last in memory."""
        x = images.permute(0, 3, 1, 2).float()
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised images (and their metadata, for a model trained with it) → one logit each.

        Flipped or transposed views arrive with permuted strides; one cheap copy into the
        layout the convolutions run fastest on (channels-last, on CUDA and CPU alike) keeps every
        view at full speed.
        """
        out = self.net(x.contiguous(memory_format=torch.channels_last))
        if self.meta_head is None:
            return out.squeeze(1)
        if meta is None:
            raise ValueError("this model was trained with model.metadata=true: pass the metadata")
        return self.meta_head(out, meta).squeeze(1)

    def model_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The one step train, validation and test share: (loss, logits, targets)."""
        self.skipped += int(batch.get("n_skipped", 0))
        logits = self(self.normalize(batch["image"]), batch.get("meta"))
        targets = batch["target"].float()
        loss = F.binary_cross_entropy_with_logits(
            logits.float(), smooth(targets, self.train_cfg.label_smoothing), pos_weight=self.pos_weight
        )
        return loss, logits.detach().float(), targets

    def training_step(self, batch: dict, batch_idx: int):
        if batch["image"].numel() == 0:
            return None
        loss, _, _ = self.model_step(batch)
        self._watch_finite(loss)
        # epoch mean only in the progress bar: a per-step value would sync the GPU every step
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True,
                 batch_size=len(batch["target"]))
        if self.global_step % self.trainer.log_every_n_steps == 0:
            self.log("train_loss_step", loss, on_step=True, on_epoch=False)
            self._raise_if_diverged()
        return loss

    def _watch_finite(self, loss: torch.Tensor) -> None:
        """Note the first step with a non-finite loss, on the device: no host sync per step."""
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach()) & (self._first_bad < 0)
        # a Python int as the other operand: no host-to-device copy, so no sync
        self._first_bad = torch.where(bad, self.global_step, self._first_bad)
        self._lrs[self.global_step] = self.trainer.optimizers[0].param_groups[0]["lr"]
        if len(self._lrs) > 4 * self.trainer.log_every_n_steps:
            self._lrs.pop(next(iter(self._lrs)))

    def _raise_if_diverged(self) -> None:
        """Checked every `log_every_n_steps` steps and before each validation."""
        if self._first_bad is None or int(self._first_bad) < 0:
            return
        step = int(self._first_bad)
        lr = self._lrs.get(step, float("nan"))
        raise TrainingDiverged(
            f"fold {self.hparams.fold}: loss is not finite (NaN or inf) from step {step} "
            f"(epoch {self.current_epoch}, lr {lr:.3g}); last.ckpt keeps the last good epoch"
        )

    def on_train_epoch_end(self) -> None:
        self._raise_if_diverged()

    def on_validation_epoch_start(self) -> None:
        # validation runs before on_train_epoch_end: stop before scoring a diverged model
        self._raise_if_diverged()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if batch["image"].numel() == 0:
            return
        loss, logits, targets = self.model_step(batch)
        self.log("val_loss", loss, on_epoch=True, batch_size=len(targets), sync_dist=True)
        self._val.append((logits, targets, batch["is_2020"]))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        logits, targets, is_2020 = (
            self.all_gather(torch.cat(t)).flatten().cpu().numpy() for t in zip(*self._val, strict=True)
        )
        self._val.clear()
        probs = expit(logits)
        is_2020 = is_2020.astype(bool)
        sanity = self.trainer.sanity_checking
        what = "sanity-check AUC" if sanity else f"fold {self.hparams.fold} val AUC"
        self.log("val_auc", safe_auc(targets, probs, what), prog_bar=True)
        self.log("val_auc_2020", safe_auc(targets[is_2020], probs[is_2020], what + " (2020)")
                 if is_2020.any() else math.nan)
        self.log("val_acc", float(((probs > 0.5) == (targets > 0.5)).mean()))
        if self.skipped:
            log.warning("%d unreadable image(s) skipped so far", self.skipped)

    def configure_optimizers(self):
        t = self.train_cfg
        total = int(self.trainer.estimated_stepping_batches)
        optimizer = torch.optim.AdamW(self.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=t.lr, total_steps=total, pct_start=warmup_fraction(t.pct_start, total),
            div_factor=t.div_factor, final_div_factor=t.final_div_factor,
        )
        # stepped per optimizer step: the blog's per-epoch stepping keeps the LR near its start
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def warmup_fraction(pct_start: float, total_steps: int) -> float:
    """OneCycle's warm-up share, raised to two steps at least: torch divides by zero when the
    warm-up is a single step (e.g. pct_start 0.1 of a 10-step smoke run)."""
    if total_steps < 4:
        raise UserError(f"OneCycle needs at least 4 optimizer steps, this run has {total_steps}: "
                        "use more epochs or a smaller batch")
    least = 2 / total_steps
    if pct_start * total_steps < 2:
        log.warning("train.pct_start=%s is under two of %d steps; using %.3f", pct_start,
                    total_steps, least)
    return min(max(pct_start, least), 1 - least)


def load_model(path: str, model: ModelConfig, device: torch.device | str = "cpu") -> MelanomaModel:
    """Load a fold checkpoint, refusing one trained for another architecture than configured."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    hp = ckpt.get("hyper_parameters", {})
    trained = hp.get("model", {}).get("backbone")
    if trained != model.backbone:
        raise UserError(
            f"{path}: checkpoint was trained with backbone {trained!r} but the config says "
            f"model.backbone={model.backbone!r}"
        )
    cfg = dict(hp["model"], pretrained=False, weights_path=None)  # weights come from the checkpoint
    net = MelanomaModel(cfg, hp["train"], hp.get("fold", -1))
    try:
        net.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise UserError(f"{path}: weights do not fit {model.backbone!r}: {str(err)[:300]}") from None
    return net.to(device).eval()
