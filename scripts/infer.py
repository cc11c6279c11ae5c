"""`make infer [GPUS="0 1"]`: TTA inference of every fold model into numbered submissions, then the ensemble."""

from pipeline.cli import run
from pipeline.infer import infer_models, run_infer
from pipeline.parallel import gpu_id, infer_parallel


def add_args(parser) -> None:
    parser.add_argument("--gpus", nargs="+", type=gpu_id, help="shard the fold models over these GPU ids")
    parser.add_argument("--shard", action="store_true",
                        help="only this process's fold models (infer.folds): no table, no ensemble")


def main(cfg, args) -> None:
    if args.shard:
        infer_models(cfg)
    elif args.gpus:
        infer_parallel(cfg, args.config, args.overrides, args.gpus)
    else:
        run_infer(cfg)


if __name__ == "__main__":
    run(main, __doc__, extra=add_args)
