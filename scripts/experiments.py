"""`make experiments`: every experiment under runs_dir in one table (CV, TTA gain, settings, commit,
Kaggle scores), printed and written to <runs_dir>/experiments.csv and experiments.html."""

from pipeline.cli import run
from pipeline.experiments import list_experiments


def main(cfg, args) -> None:
    print(list_experiments(cfg))


if __name__ == "__main__":
    run(main, __doc__)
