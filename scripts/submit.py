"""`make submit MSG="..."`: check the ensemble CSV, then `kaggle competitions submit` it."""

from pipeline.cli import run
from pipeline.submit import submit


def add_args(parser) -> None:
    # Overrides are parsed as YAML, so a message like "lr: 3e-4" or "[b5] x" fails as
    # submit.message=...; --message passes the text as is.
    parser.add_argument("--message", help="submission message (default: submit.message)")


def main(cfg, args) -> None:
    submit(cfg, args.message if args.message is not None else cfg.submit.message)


if __name__ == "__main__":
    run(main, __doc__, extra=add_args)
