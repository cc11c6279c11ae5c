"""Typed run configuration: dataclass defaults, one YAML per experiment, `section.key=value` overrides.

Unknown keys and wrong types are errors that name the key and the file they came from.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.atomic import atomic_write_text

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration file or override is invalid."""


@dataclass
class ColumnsConfig:
    """Column names of the input CSVs, in one place (2020 competition and ISIC 2019 style)."""

    image: str = "image_name"
    patient: str = "patient_id"
    target: str = "target"
    sex: str = "sex"
    age: str = "age_approx"
    site: str = "anatom_site_general_challenge"
    diagnosis: str = "diagnosis"
    ext_image: str = "image"
    ext_target: str = "MEL"
    ext_lesion: str = "lesion_id"
    lesion_image: str = "image"  # the image column of `external[].lesions_csv` (ISIC's metadata)
    ext_sex: str = "sex"
    ext_age: str = "age_approx"
    ext_site: str = "anatom_site_general"
    ext_diagnoses: list[str] = field(
        default_factory=lambda: ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    )
    dup_image: str = "image_name_1"
    dup_other: str = "image_name_2"


@dataclass
class ExternalConfig:
    """One external data set in ISIC 2019 layout."""

    name: str = "isic2019"
    ground_truth_csv: str = "data/external/ISIC_2019_Training_GroundTruth.csv"
    metadata_csv: str | None = "data/external/ISIC_2019_Training_Metadata.csv"
    images: str = "data/external/jpeg"
    # lesion ids by image name (ISIC's ISIC_2019_Training_Metadata.csv), for a set whose own
    # CSVs have none (the merged 512-px re-encode): images of one lesion never straddle folds
    lesions_csv: str | None = None


@dataclass
class MergedConfig:
    """One CSV holding the 2020 training images and external ones, told apart by a source column:
    the Kaggle data set shonenkov/melanoma-merged-external-data-512x512-jpeg (`marking.csv`)."""

    csv: str = "data/merged/marking.csv"
    images: str = "data/merged/512x512-dataset-melanoma/512x512-dataset-melanoma"
    dataset: str = "shonenkov/melanoma-merged-external-data-512x512-jpeg"  # for `make download`
    image: str = "image_id"
    patient: str = "patient_id"  # 2020: the patient; ISIC 2019: the lesion id; others: empty
    source: str = "source"
    competition_source: str = "ISIC20"  # the source value of the 2020 training images


@dataclass
class DataConfig:
    train_csv: str = "data/train.csv"
    test_csv: str = "data/test.csv"
    sample_submission: str = "data/sample_submission.csv"
    train_images: str = "data/jpeg512/train"  # where `make download` puts the 512-px JPEGs
    test_images: str = "data/jpeg512/test"
    image_ext: str = ".jpg"
    external: list[ExternalConfig] = field(default_factory=list)
    merged: MergedConfig | None = None  # set: read the training images from one merged CSV instead
    duplicates_csv: str | None = None
    check_images: bool = True
    skip_bad_images: bool = False
    # where JPEGs are decoded and augmented: cpu (loader workers, OpenCV + albumentations) | gpu
    # (workers read bytes; nvJPEG and batched tensor ops on the device) | auto (gpu on CUDA).
    # cpu until the GPU path has been measured on a GPU (scripts/device_bench.sh; docs/benchmarks.md)
    decode: str = "cpu"
    reduced_decode: bool = True  # decode big JPEGs at 1/2, 1/4, 1/8 scale when still >= image_size
    image_size: int = 256
    crop_size: int = 224
    # evaluation: `full` resizes the whole image to crop_size (the winners'); `center_crop` resizes
    # to image_size and keeps the centre crop_size (drops ~21% of the area at 456 of 512)
    eval_resize: str = "full"
    batch_size: int = 32
    num_workers: int = 2
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)


@dataclass
class FoldsConfig:
    n_folds: int = 5
    seed: int = 42
    external: str = "train_only"  # train_only (fold -1) | spread
    output: str = "folds/folds.csv"


@dataclass
class SyntheticConfig:
    out_dir: str = "data/synthetic"
    n_patients: int = 60
    n_test_patients: int = 20
    n_external_lesions: int = 80
    positive_rate: float = 0.0176
    image_size: int = 128
    label_noise: float = 0.05
    seed: int = 0
    n_jobs: int = 2


@dataclass
class ModelConfig:
    backbone: str = "efficientnet_b0"
    pretrained: bool = False
    weights_path: str | None = None
    drop_rate: float = 0.2  # dropout before the classifier, applied once
    drop_path_rate: float = 0.1
    target: str = "binary"  # binary (one logit) | diagnosis (9 ISIC 2019 classes; score = P(MEL))
    # sex, age, site, images per patient and JPEG bytes through an MLP beside the image features
    metadata: bool = False
    meta_dims: list[int] = field(default_factory=lambda: [512, 128])  # the MLP's widths
    dropout_samples: int = 1  # >1: multi-sample dropout, that many masks averaged (winners: 5)


@dataclass
class AugConfig:
    hflip: float = 0.5
    vflip: float = 0.5
    transpose: float = 0.5
    affine: float = 0.5
    shift: float = 0.1
    scale: float = 0.15
    rotate: int = 45
    color: float = 0.5
    blur_noise: float = 0.3
    dropout: float = 0.3
    dropout_holes: int = 4


@dataclass
class TrainConfig:
    epochs: int = 7
    lr: float = 3e-4
    weight_decay: float = 1e-2
    pct_start: float = 0.1
    div_factor: float = 10.0
    final_div_factor: float = 100.0
    base_momentum: float = 0.85  # OneCycle's momentum (AdamW's beta1) cycle, torch's defaults
    max_momentum: float = 0.95
    pos_weight: float = 3.0
    label_smoothing: float = 0.05
    precision: str = "auto"  # auto | 32 | 16-mixed | bf16-mixed
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    accelerator: str = "auto"
    devices: Any = 1
    seed: int = 42
    early_stopping_patience: int | None = None
    # what picks best.ckpt (and early stopping): val_auc_2020, the AUC on the competition's own
    # images, or val_auc over every validation row (external ones too in spread mode)
    monitor: str = "val_auc_2020"
    # last.ckpt is written after every epoch; set this to also write it within long epochs
    checkpoint_every_minutes: float | None = None
    progress_bar: bool = True
    log_every_n_steps: int = 50  # each logged step (and divergence check) syncs the GPU once
    # Lightning's meaning: an int is a number of batches, a float in (0, 1] a share of them
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    bootstrap: int = 1000
    aug: AugConfig = field(default_factory=AugConfig)


@dataclass
class InferConfig:
    checkpoint: str = "best"  # best | last
    views: list[str] = field(
        default_factory=lambda: [
            "identity", "hflip", "vflip", "rot90", "rot180", "rot270", "transpose", "antitranspose"
        ]
    )
    random_passes: int = 0
    random_seed: int = 0
    average: str = "mean"  # how views of one model combine: mean | logit | rank
    batch_size: int = 64
    max_forward_batch: int = 512  # on CUDA, views of a batch share a forward up to this many images
    oof_tta: bool = True
    folds: list[int] = field(default_factory=list)  # fold models to run (empty: all)
    submissions_dir: str = "submissions"


@dataclass
class EnsembleConfig:
    method: str = "mean"  # mean | rank | weighted
    experiments: list[str] = field(default_factory=list)
    folds: list[int] = field(default_factory=list)
    views: list[str] = field(default_factory=list)
    n_min: int | None = None
    n_max: int | None = None
    numbers: list[int] = field(default_factory=list)  # exact submission numbers (empty: all)
    output: str = "submissions/ensemble.csv"


@dataclass
class SubmitConfig:
    competition: str = "siim-isic-melanoma-classification"
    message: str = ""


@dataclass
class BenchConfig:
    """`make bench`: sizes for the side-by-side speed figures (CPU-sized defaults)."""

    backbone: str = "efficientnet_b0"
    jpeg_size: int = 256
    image_size: int | None = None  # the resize before the training crop (None: crop_size)
    crop_size: int = 128
    n_images: int = 256
    batch_size: int = 16
    train_steps: int = 14
    warmup_steps: int = 4
    num_workers: int = 2
    repeats: int = 3
    paths: list[str] = field(default_factory=lambda: ["cpu", "gpu"])  # data paths side by side
    profile: bool = False  # torch.profiler tables of 8-view TTA and training steps, per path
    ensemble_files: int = 50
    ensemble_rows: int = 11000
    folds_rows: int = 60000
    work_dir: str = "runs/bench"


@dataclass
class CompareConfig:
    """`make compare`: options measured side by side, each over several training seeds."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    variants: dict[str, list[str]] = field(default_factory=lambda: {
        "baseline": [],
        "diagnosis": ["model.target=diagnosis"],
        "metadata": ["model.metadata=true"],
        "center_crop": ["data.eval_resize=center_crop"],
    })
    output: str = "runs/compare"


@dataclass
class SlurmConfig:
    """`make slurm`: a job array over folds, one GPU each, and a summary job after it."""

    partition: str | None = None
    account: str | None = None
    time: str = "24:00:00"
    cpus_per_task: int = 8
    mem: str = "64G"
    gpus_per_task: int = 1
    python: str = ".venv/bin/python"


@dataclass
class Config:
    experiment: str = "default"
    runs_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    folds: FoldsConfig = field(default_factory=FoldsConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    submit: SubmitConfig = field(default_factory=SubmitConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.experiment


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        reason = str(err).splitlines()[0]
        raise ConfigError(f"{source}: invalid config key {key!r}: {reason}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML at `path`, then `section.key=value` overrides; validated against the dataclasses."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:  # YAML syntax errors come in several types
            raise ConfigError(f"{path}: cannot parse YAML: {err}") from None
        cfg = _merge(cfg, loaded, str(path))
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
    indexed = [o for o in overrides or () if any(p.isdigit() for p in o.split("=", 1)[0].split("."))]
    plain = [o for o in overrides or () if o not in indexed]
    if plain:
        cfg = _merge(cfg, OmegaConf.from_dotlist(plain), "command-line override")
    for item in indexed:
        _apply_override(cfg, item)
    return OmegaConf.to_object(cfg)


def _apply_override(cfg: DictConfig, item: str) -> None:
    """One `section.key=value` override whose key indexes a list (`data.external.0.images=/x`)."""
    key, raw = item.split("=", 1)
    node: Any = cfg
    for part in key.split(".")[:-1]:
        if isinstance(node, ListConfig):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"command-line override {key!r}: {part!r} is not an index of a "
                                  f"list of {len(node)} entr(ies); give the whole list instead")
            node = node[int(part)]
        elif isinstance(node, DictConfig) and part in node:
            node = node[part]
        else:
            break  # an unknown key: OmegaConf names it below
    try:
        value = OmegaConf.from_dotlist([f"value={raw}"])["value"]
        OmegaConf.update(cfg, key, value, merge=True)
    except OmegaConfBaseException as err:
        reason = str(err).splitlines()[0]
        raise ConfigError(f"command-line override: invalid config key {key!r}: {reason}") from None


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_hash(cfg: Config) -> str:
    """Short stable hash of the resolved config, to tell runs apart in manifests."""
    return hashlib.sha1(to_yaml(cfg).encode()).hexdigest()[:10]


# what decides the trained models; paths of the test set, workers, where images are decoded
# (both paths draw the same augmentations) and the later stages do not
TRAINING_SECTIONS = ("data", "folds", "model", "train")
NOT_TRAINING = {"data.num_workers", "data.decode", "data.check_images", "data.test_csv", "data.test_images",
                "data.sample_submission", "train.checkpoint_every_minutes", "train.progress_bar",
                "train.log_every_n_steps"}


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def training_settings(cfg: Config) -> dict[str, Any]:
    """The flattened settings that shape a trained model (`data.batch_size`, `train.epochs`, ...)."""
    tree = OmegaConf.to_container(OmegaConf.structured(cfg))
    flat = _flat({k: tree[k] for k in TRAINING_SECTIONS})
    return {k: v for k, v in flat.items() if k not in NOT_TRAINING}


# what decides the folds file: its inputs and the split
FOLDS_SETTINGS = ("data.train_csv", "data.train_images", "data.image_ext", "data.external",
                  "data.merged", "data.duplicates_csv", "data.columns", "folds.n_folds", "folds.seed",
                  "folds.external")


def changed_folds_settings(old: Config, new: Config) -> list[str]:
    """`key: old -> new` for each setting that shapes the folds file and differs."""
    def flat(cfg: Config) -> dict[str, Any]:
        tree = _flat(OmegaConf.to_container(OmegaConf.structured(cfg)))
        return {k: v for k, v in tree.items() if k.startswith(FOLDS_SETTINGS)}
    a, b = flat(old), flat(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def changed_settings(old: Config, new: Config) -> list[str]:
    """`key: old -> new` for each training setting that differs."""
    a, b = training_settings(old), training_settings(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def save_config(cfg: Config, folder: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config next to a stage's outputs."""
    path = Path(folder) / name
    atomic_write_text(path, to_yaml(cfg))
    return path
