"""`make slurm`: write runs/<experiment>/slurm/{train.sbatch, summary.sbatch, submit.sh}."""

from pipeline.cli import run
from pipeline.slurm import write_slurm


def main(cfg, args) -> None:
    write_slurm(cfg, args.config, args.overrides)


if __name__ == "__main__":
    run(main, __doc__)
