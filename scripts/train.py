"""`make train FOLD=k` / `make train-all [GPUS="0 1"]`: one Lightning model per fold, then the CV table."""

from pipeline.cli import run
from pipeline.parallel import gpu_id, train_parallel
from pipeline.train import summarize_finished, train_all


def add_args(parser) -> None:
    parser.add_argument("--folds", type=int, nargs="+", help="folds to train (default: all)")
    parser.add_argument("--gpus", nargs="+", type=gpu_id, help="train folds in parallel, one process per GPU id")
    parser.add_argument("--summary-only", action="store_true", help="only the OOF and cv.json of finished folds")
    parser.add_argument("--no-summary", action="store_true", help="train only (a fold process of a parallel run)")


def main(cfg, args) -> None:
    if args.summary_only:
        summarize_finished(cfg)
    elif args.gpus:
        train_parallel(cfg, args.config, args.overrides, args.gpus, args.folds)
    else:
        train_all(cfg, args.folds, summary=not args.no_summary)


if __name__ == "__main__":
    run(main, __doc__, extra=add_args)
