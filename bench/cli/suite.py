"""`tokenbench suite gpu`: the GPU speed tables, target check and boards in one command (`tokenbench.suite`)."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("suite", help="a prepared run: 'gpu' measures every speed table and board the README "
                                     "reports for a GPU")
    p.add_argument("name", choices=["gpu"], help="the suite to run")
    p.add_argument("--out", required=True, help="folder for the tables, plots, boards and README.md (results/gpu-NAME)")
    p.add_argument("--cifar10-root", default=None, help="CIFAR-10 folder for the CIFAR-10 board (skipped without it)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true",
                   help="the same run shrunk to a tiny model, two batch sizes and one round: checks the path in seconds")
    return p


def run(args):
    from tokenbench.run.suite import gpu_suite

    gpu_suite(args.out, args.cifar10_root, args.device, args.quick, log=lambda line: print(line, flush=True))
    return 0
