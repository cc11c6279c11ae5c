"""`make download`: competition CSVs and 512-px JPEGs (2020, ISIC 2019) into data/ via the kaggle CLI."""

from pipeline.cli import run
from pipeline.download import download


def add_args(parser) -> None:
    parser.add_argument("--force", action="store_true", help="download again even if done before")


def main(cfg, args) -> None:
    download(cfg, force=args.force)


if __name__ == "__main__":
    run(main, __doc__, extra=add_args)
