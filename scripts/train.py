"""`make train FOLD=k` / `make train-all`: one Lightning model per fold, then the CV table."""

from pipeline.cli import run
from pipeline.train import train_all


def add_args(parser) -> None:
    parser.add_argument("--folds", type=int, nargs="+", help="folds to train (default: all)")


def main(cfg, args) -> None:
    train_all(cfg, args.folds)


if __name__ == "__main__":
    run(main, __doc__, extra=add_args)
