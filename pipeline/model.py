"""The LightningModule: any timm backbone, a binary or 9-class diagnosis head (optionally with
metadata and multi-sample dropout), smoothed weighted losses, AdamW + OneCycle per step.

Whatever the target, `forward` returns one score logit per image (for the diagnosis target the
logit of P(MEL)), so TTA, OOF and ensembling see the same thing."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from scipy.special import expit
from torch import nn

from pipeline.config import ModelConfig, TrainConfig
from pipeline.diagnosis import CLASSES, MEL
from pipeline.errors import UserError
from pipeline.metadata import N_FEATURES
from pipeline.metrics import safe_auc

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


TARGETS = ("binary", "diagnosis")
MONITORS = ("val_auc_2020", "val_auc")


def create_backbone(cfg: ModelConfig, num_classes: int = 0) -> nn.Module:
    """A timm model giving pooled features (`num_classes=0`); local weights via `weights_path`, no
    hub at run time. Its own head dropout stays off: the `Head` applies dropout once."""
    kwargs = {"num_classes": num_classes, "drop_rate": 0.0, "drop_path_rate": cfg.drop_path_rate}
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


def meta_mlp(n_in: int, dims: list[int]) -> nn.Sequential:
    """Metadata through Linear -> BatchNorm -> Swish blocks (the 1st-place solution's meta branch)."""
    layers: list[nn.Module] = []
    for width in dims:
        layers += [nn.Linear(n_in, width), nn.BatchNorm1d(width), nn.SiLU()]
        n_in = width
    return nn.Sequential(*layers)


class Head(nn.Module):
    """Pooled image features (and the metadata MLP's output) -> dropout -> `n_out` logits.

    Dropout is applied once; with `samples` > 1, that many dropout masks go through the shared
    classifier and their logits are averaged (multi-sample dropout), in training only.
    """

    def __init__(self, n_features: int, n_out: int, drop: float, samples: int = 1,
                 meta_dims: list[int] | None = None):
        super().__init__()
        self.meta = meta_mlp(N_FEATURES, meta_dims) if meta_dims else None
        width = n_features + (meta_dims[-1] if meta_dims else 0)
        self.drop = nn.Dropout(drop)
        self.samples = max(1, samples)
        self.fc = nn.Linear(width, n_out)

    def forward(self, features: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        x = features
        if self.meta is not None:
            if meta is None:
                raise ValueError("this model was trained with model.metadata=true: pass the metadata")
            x = torch.cat([x, self.meta(meta.to(x.dtype))], dim=1)
        if not self.training or self.samples == 1:
            return self.fc(self.drop(x))
        return torch.stack([self.fc(self.drop(x)) for _ in range(self.samples)]).mean(0)


def score_logit(outputs: torch.Tensor) -> torch.Tensor:
    """One logit per image from the head's outputs: the binary logit, or log P(MEL) / (1 - P(MEL))."""
    if outputs.shape[1] == 1:
        return outputs[:, 0]
    others = torch.cat([outputs[:, :MEL], outputs[:, MEL + 1:]], dim=1)
    return outputs[:, MEL] - torch.logsumexp(others, dim=1)


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
        m = self.model_cfg
        if m.target not in TARGETS:
            raise UserError(f"model.target must be one of {list(TARGETS)}, got {m.target!r}")
        self.net = create_backbone(m)
        # pooled width: timm models with a pre-logits stage (MobileNetV3, GhostNet) say head_hidden_size
        width = getattr(self.net, "head_hidden_size", None) or self.net.num_features
        self.head = Head(width, 1 if m.target == "binary" else len(CLASSES),
                         m.drop_rate, m.dropout_samples, list(m.meta_dims) if m.metadata else None)
        data_cfg = timm.data.resolve_data_config({}, model=self.net)
        self.register_buffer("mean", torch.tensor(data_cfg["mean"]).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(data_cfg["std"]).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pos_weight", torch.tensor([self.train_cfg.pos_weight]), persistent=False)
        # the diagnosis target weighs melanoma like the binary target's pos_weight
        class_weight = torch.ones(len(CLASSES))
        class_weight[MEL] = self.train_cfg.pos_weight
        self.register_buffer("class_weight", class_weight, persistent=False)
        self._val: list[tuple[torch.Tensor, ...]] = []
        self.val_predictions: pd.DataFrame | None = None  # the last validation, one row per image
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

    def outputs(self, x: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised images (and their metadata, for a model trained with it) -> the head's
        logits (B, 1) or (B, 9).

        Flipped or transposed views arrive with permuted strides; one cheap copy into the
        layout the convolutions run fastest on (channels-last, on CUDA and CPU alike) keeps every
        view at full speed.
        """
        return self.head(self.net(x.contiguous(memory_format=torch.channels_last)), meta)

    def forward(self, x: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        """One score logit per image (for the diagnosis target, the logit of P(MEL))."""
        return score_logit(self.outputs(x, meta))

    def loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        """Smoothed pos-weighted BCE (binary), or smoothed melanoma-weighted cross-entropy (diagnosis)."""
        smoothing = self.train_cfg.label_smoothing
        if outputs.shape[1] == 1:
            targets = smooth(batch["target"].float(), smoothing)
            return F.binary_cross_entropy_with_logits(outputs[:, 0].float(), targets, pos_weight=self.pos_weight)
        return F.cross_entropy(outputs.float(), batch["label"], weight=self.class_weight,
                               label_smoothing=smoothing)

    def model_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The one step train, validation and test share: (loss, score logits, targets)."""
        self.skipped += int(batch.get("n_skipped", 0))
        outputs = self.outputs(self.normalize(batch["image"]), batch.get("meta"))
        loss = self.loss(outputs, batch)
        return loss, score_logit(outputs.detach()).float(), batch["target"].float()

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
        self._val.append((batch["index"], logits, targets, batch["is_2020"]))

    def _gather_validation(self) -> np.ndarray | None:
        """The epoch's rows (index, logit, target, is_2020) from every rank, as a (4, N) array.

        Every rank joins the gather, with its rows padded to the longest rank's count: ranks hold
        different counts when unreadable images were skipped, and gathers need equal shapes.
        """
        columns = [torch.cat(t).float() for t in zip(*self._val, strict=True)] if self._val else []
        self._val.clear()
        count = torch.tensor([len(columns[0]) if columns else 0], device=self.device)
        longest = int(self.all_gather(count).max())
        if longest == 0:
            return None
        padded = torch.full((4, longest), -1.0, device=self.device)
        for i, column in enumerate(columns):
            padded[i, : len(column)] = column.to(self.device)
        rows = self.all_gather(padded).reshape(-1, 4, longest).permute(1, 0, 2).reshape(4, -1)
        rows = rows.cpu().numpy()
        return rows[:, rows[0] >= 0]  # padding has index -1

    def on_validation_epoch_end(self) -> None:
        rows = self._gather_validation()
        if rows is None:
            return
        index, logits, targets, is_2020 = rows
        # under DDP the sampler pads the last ranks with repeats of the first rows: score each
        # validation image once
        index, first = np.unique(index.astype(np.int64), return_index=True)
        logits, targets, is_2020 = logits[first], targets[first], is_2020[first]
        self.val_predictions = pd.DataFrame({"index": index, "prob": expit(logits), "target": targets})
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
            base_momentum=t.base_momentum, max_momentum=t.max_momentum,
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


def read_checkpoint(path: str) -> dict:
    """A Lightning checkpoint as a dict, or one error naming the file and what is wrong with it."""
    size = Path(path).stat().st_size if Path(path).is_file() else None
    if size is None:
        raise UserError(f"{path}: checkpoint not found")
    if size == 0:
        raise UserError(f"{path}: checkpoint is empty (0 bytes): a copy or save that never finished")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises EOFError, UnpicklingError, RuntimeError, ... by damage
        raise UserError(f"{path}: not a readable checkpoint ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200] if str(err) else 'no detail'}); "
                        "truncated or corrupt: retrain the fold or restore the file") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"{path}: not a Lightning checkpoint (no state_dict)")
    return ckpt


def load_model(path: str, model: ModelConfig, device: torch.device | str = "cpu") -> MelanomaModel:
    """Load a fold checkpoint, refusing one trained for another architecture than configured,
    and naming the file when it is empty, truncated or not a checkpoint at all."""
    ckpt = read_checkpoint(path)
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
