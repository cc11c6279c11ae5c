"""`make scores`: read Kaggle's scores for the pending rows of submissions/scores.csv, then print it."""

from pipeline.cli import run
from pipeline.scores import refresh_scores


def main(cfg, args) -> None:
    refresh_scores(cfg)


if __name__ == "__main__":
    run(main, __doc__)
