"""`make slurm`: SLURM job scripts for a cluster: an array job, one task per fold on one GPU, and a
summary job that runs once every fold has finished.

Preemption: `--requeue` with `--signal=SIGUSR1@120` lets Lightning's SLURM environment save a
checkpoint (`hpc_ckpt_<n>.ckpt` in the fold folder) and requeue the task; the requeued task resumes
from the newest of that and `last.ckpt` (`pipeline.train.resume_checkpoint`).
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

from pipeline.atomic import atomic_write_text
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.parallel import pending_folds

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]


def slurm_time(value: str) -> str:
    """`slurm.time` as written. A bare number is refused: YAML turns an unquoted 12:00:00 into
    43200 (seconds, base 60), while SLURM reads a number as minutes."""
    if value.isdigit():
        raise UserError(f"slurm.time={value} is a bare number: YAML reads an unquoted 12:00:00 as "
                        f"{12 * 3600} seconds and SLURM reads a number as minutes; quote it, e.g. "
                        "slurm.time='12:00:00'")
    return value


def _header(cfg: Config, name: str, log_name: str) -> list[str]:
    s = cfg.slurm
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --time={slurm_time(s.time)}",
             f"#SBATCH --cpus-per-task={s.cpus_per_task}", f"#SBATCH --mem={s.mem}",
             f"#SBATCH --output={cfg.run_dir.resolve() / 'slurm' / log_name}",
             "#SBATCH --open-mode=append"]  # a requeued task adds to its log
    lines += [f"#SBATCH --partition={s.partition}"] if s.partition else []
    lines += [f"#SBATCH --account={s.account}"] if s.account else []
    return lines


def _command(cfg: Config, config_path: str | None, overrides: list[str], tail: str) -> str:
    config = ["--config", config_path] if config_path else []
    args = " ".join(shlex.quote(a) for a in [cfg.slurm.python, "scripts/train.py", *config, *overrides])
    return "\n".join([f"cd {shlex.quote(str(REPO))}", "export NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1",
                      f"srun {args} {tail}"])


def train_script(cfg: Config, config_path: str | None, overrides: list[str], folds: list[int]) -> str:
    """The array job: task k trains fold k on one GPU; preempted tasks requeue and resume."""
    lines = _header(cfg, f"{cfg.experiment}-folds", "fold_%a.log") + [
        f"#SBATCH --array={','.join(str(f) for f in folds)}",
        f"#SBATCH --gpus-per-task={cfg.slurm.gpus_per_task}",
        "#SBATCH --ntasks=1", "#SBATCH --requeue", "#SBATCH --signal=SIGUSR1@120",
        _command(cfg, config_path, overrides, "--folds $SLURM_ARRAY_TASK_ID --no-summary"),
    ]
    return "\n".join(lines) + "\n"


def summary_script(cfg: Config, config_path: str | None, overrides: list[str]) -> str:
    """The job after the array: the OOF and cv.json of every finished fold (no GPU)."""
    lines = _header(cfg, f"{cfg.experiment}-summary", "summary.log") + [
        "#SBATCH --ntasks=1", _command(cfg, config_path, overrides, "--summary-only")]
    return "\n".join(lines) + "\n"


def write_slurm(cfg: Config, config_path: str | None, overrides: list[str]) -> Path | None:
    """runs/<experiment>/slurm/{train.sbatch, summary.sbatch, submit.sh}; returns submit.sh, or
    None when every fold is finished (nothing written)."""
    folds = pending_folds(cfg, None)
    if not folds:
        log.info("every fold of %s is finished: no job written (make train-all summarises)", cfg.experiment)
        return None
    folder = cfg.run_dir / "slurm"
    atomic_write_text(folder / "train.sbatch", train_script(cfg, config_path, overrides, folds))
    atomic_write_text(folder / "summary.sbatch", summary_script(cfg, config_path, overrides))
    submit = folder / "submit.sh"
    atomic_write_text(submit, "#!/bin/bash\nset -euo pipefail\ncd \"$(dirname \"$0\")\"\n"
                      "array=$(sbatch --parsable train.sbatch)\n"
                      "sbatch --dependency=afterok:${array%%;*} summary.sbatch\n")
    log.info("wrote %s; submit the folds %s and the summary after them with: bash %s", folder, folds, submit)
    return submit
