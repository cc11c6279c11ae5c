"""`make folds`: merge the training CSVs and write stratified, patient-grouped folds."""

from pipeline.cli import run
from pipeline.folds import run_folds


def main(cfg, args) -> None:
    run_folds(cfg)


if __name__ == "__main__":
    run(main, __doc__)
