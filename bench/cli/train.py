"""`tokenbench train`: train a backbone (or fine-tune one with a method in place) and save a checkpoint."""

from __future__ import annotations

import inspect

from tokenbench.cli.options import add_knob_options, given_knobs
from tokenbench.errors import BenchError
from tokenbench.reduce.knobs import format_value
from tokenbench.reduce.registry import declared_methods, get_method, method_class


def add_parser(sub):
    p = sub.add_parser("train", help="train a model on a dataset (or fine-tune one with a method) and save a checkpoint")
    p.add_argument("--model", default="vit_digits", help="timm model name (default: vit_digits)")
    p.add_argument("--method", default=None,
                   help="train with this method in place: its own loss (dvt, dynamicvit) or plain fine-tuning")
    p.add_argument("--init", default=None, help="checkpoint to start from (its model replaces --model)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run whose state is saved beside --out (OUT.partial) after every epoch")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", required=True, help="checkpoint file to write")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-epochs", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe", default="light", choices=["light", "strong"],
                   help="light: geometric augmentation only (default); strong: TrivialAugment, mixup/cutmix, "
                        "stochastic depth, EMA and a compact resume state (the CIFAR-10 v2 reference)")
    p.add_argument("--probe", action="append", default=None, metavar="METHOD:KNOB=V",
                   help="every 5 epochs, record this method's val top-1 on the model being trained (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--device", default="cpu")
    add_knob_options(p, many=False, default_help="with --method, while training; default: the method's own")
    owners = {}  # option dest -> the method that added it
    for name, declared in declared_methods().items():  # only a method that adds options is imported
        if "add_training_options" in getattr(declared, "declared_functions", vars(declared)):
            cls = method_class(name)
            group = p.add_argument_group(f"with --method {name}")
            cls.add_training_options(group)
            owners.update({action.dest: (name, action.default) for action in group._group_actions})
    p.set_defaults(method_options=owners)
    return p


def method_options(args) -> dict:
    """{dest: value} of the training options of --method (those another method added must keep their default)."""
    mine = {}
    for dest, (owner, default) in args.method_options.items():
        if owner == args.method:
            mine[dest] = getattr(args, dest)
        elif getattr(args, dest) != default:
            flag = f"--{dest.replace('_', '-')}"
            raise BenchError(f"{flag} is an option of --method {owner}: use it with --method {owner}")
    return mine


def augmenting(eval_tf, flip: bool = False, strength: str = "light", size: int = 32):
    """Augmentation around the model's eval transform (mirroring only for natural images): light geometric
    jitter, or (trivial) TrivialAugment and then random crops of the reflect-padded input (`size` square),
    the CIFAR recipe of DeiT-style small-dataset training."""
    from torchvision import transforms

    if strength == "trivial":
        before = [transforms.TrivialAugmentWide()]
        after = [transforms.RandomCrop(size, padding=size // 8, padding_mode="reflect")]
    else:
        before, after = [transforms.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))], []
    return transforms.Compose(before + [transforms.RandomHorizontalFlip()] * flip + [eval_tf] + after)


def probe_functions(cells: list[str], loader) -> dict:
    """Each `METHOD:KNOB=V` cell as a function of a model: that method's top-1 on `loader`."""
    from tokenbench.api import apply
    from tokenbench.run import training as training
    from tokenbench.run.speed import parse_cell

    def probe(name, knobs):
        return lambda model: training.accuracy(apply(model, name, **knobs), loader)

    return {cell: probe(*parse_cell(cell)) for cell in cells}


def check_output_file(path: str) -> None:
    """Before any training: `path` can be written (not a folder, in a folder that takes files)."""
    import os
    from pathlib import Path

    out = Path(path)
    if out.is_dir():
        raise BenchError(f"--out {out}: is a folder; give the checkpoint file to write")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".tokenbench-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise BenchError(f"--out {out}: cannot write there ({err.strerror or err}); nothing was trained") from None


def method_knobs(method, args) -> dict:
    """The knobs `method.training_loss` takes: as given (checked by this method's knobs), else its own
    default, else the middle of the sweep."""
    given = method.parse_knobs(given_knobs(args))
    params = inspect.signature(method.training_loss).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
    knobs = {}
    for k in method.knobs:
        if k.name not in params and not takes_all:
            continue
        default = params[k.name].default if k.name in params else inspect.Parameter.empty
        knobs[k.name] = given[k.name] if k.name in given else (
            default if default is not inspect.Parameter.empty else sorted(k.sweep)[len(k.sweep) // 2])
    return knobs


def run(args):
    import os
    from pathlib import Path

    import torch
    from torch.utils.data import DataLoader

    from tokenbench.data import registry as datasets
    from tokenbench.models import loading as models
    from tokenbench.run import training as training

    if given_knobs(args) and not args.method:
        raise BenchError(f"{next(iter(given_knobs(args)))!r} is a method knob: pass --method too")
    if args.epochs < 1:
        raise BenchError("--epochs must be at least 1")
    check_output_file(args.out)
    state_file = f"{args.out}.partial"
    if os.path.exists(state_file) and not args.resume:
        raise BenchError(f"{state_file} holds an interrupted run: pass --resume to continue it, or delete it")
    method = get_method(args.method) if args.method else None
    options = method_options(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.recipe != "light" and args.method:
        raise BenchError(f"--recipe {args.recipe} trains a backbone (from scratch, or on from --init): drop --method")
    torch.manual_seed(args.seed)
    probe = datasets.build_dataset(args.dataset, "test", transform=lambda im: im, root=args.data_root)
    recipe = training.RECIPES[args.recipe]
    stochastic_depth = {"drop_path_rate": recipe["drop_path"]} if "drop_path" in recipe else {}
    if args.init:
        loaded = models.load_model(checkpoint=args.init)
        model, name = loaded.model, loaded.name
        model_kwargs = dict(models.read_checkpoint(args.init).get("model_kwargs", {}))
        if stochastic_depth:  # a backbone trained on (a second schedule) with the recipe's stochastic depth
            model = models.create(name, num_classes=loaded.model.num_classes, **model_kwargs, **stochastic_depth)
            model.load_state_dict(loaded.model.state_dict())
    else:
        name = args.model
        model_kwargs = method.training_model_kwargs(options) if method else {}
        model = models.create(name, num_classes=probe.num_classes, **model_kwargs, **stochastic_depth)
        if method:
            method.prepare_training_model(model, options, lambda path: models.load_model(checkpoint=path).model)
    knobs = method_knobs(method, args) if method else {}
    trainee, loss = method.training_loss(model, **knobs) if method else (model, None)
    eval_tf = datasets.eval_transform(model)
    size = models.input_shape(model)[-1]
    train_set = datasets.build_dataset(args.dataset, "train", augmenting(eval_tf, probe.mirror_invariant, recipe["augment"], size),
                                       args.data_root).dataset
    val_loader = DataLoader(datasets.build_dataset(args.dataset, "val", eval_tf, args.data_root).dataset, batch_size=256)
    test_loader = DataLoader(datasets.build_dataset(args.dataset, "test", eval_tf, args.data_root).dataset, batch_size=256)
    fields = {k: v for k, v in recipe.items() if k not in ("augment", "drop_path")}
    cfg = training.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                               warmup_epochs=args.warmup_epochs, probes=probe_functions(args.probe or [], val_loader),
                               optimizer=method.training_optimizer if method else "adamw", **fields)
    loss_fn = None if loss is None else (lambda m, x, y: loss(m, x, y, cfg.label_smoothing))
    identity = {k: v for k, v in vars(args).items()  # the settings that decide the weights
                if k not in ("resume", "threads", "device", "probe") and isinstance(v, (str, int, float, type(None)))}
    history = training.train(trainee, train_set, cfg, loss_fn=loss_fn, val_loader=val_loader, device=args.device,
                             state_file=state_file, identity=identity)
    test_top1 = training.accuracy(trainee, test_loader, args.device)
    start = ["--init", args.init] if args.init else ["--model", name]
    with_method = ["--method", args.method] if args.method else []
    if method and not args.init:
        with_method += [f"--{dest.replace('_', '-')} {value}" for dest, value in options.items() if value is not None]
    command = " ".join(["tokenbench train", *start, *with_method, *(f"{k.flag} {format_value(knobs[k.name])}" for k in (method.knobs if method else ()) if k.name in knobs),
                        f"--dataset {args.dataset}", *(["--data-root", args.data_root] if args.data_root else []),
                        f"--epochs {args.epochs} --batch-size {args.batch_size} --lr {args.lr} "
                        f"--warmup-epochs {args.warmup_epochs:g} --seed {args.seed}",
                        *([f"--recipe {args.recipe}"] if args.recipe != "light" else []),
                        *(f"--probe {cell}" for cell in args.probe or []),
                        *([f"--threads {args.threads}"] if args.threads else []), f"--out {args.out}"])
    meta = {
        "command": command,
        "dataset": args.dataset, "test_top1": test_top1, "val_top1": training.final_val_top1(history),
        "epochs": args.epochs, "seed": args.seed, "threads": torch.get_num_threads(), "recipe": args.recipe,
        "torch": str(torch.__version__), "history": history,
    }
    if method is not None:
        meta.update(trained_with=args.method, knobs=knobs, init=args.init, **method.training_record(model, test_loader))
    models.save_checkpoint(args.out, model.cpu(), name, meta, model_kwargs)
    Path(state_file).unlink(missing_ok=True)  # the finished run needs no resume state
    print(f"test top-1 {test_top1:.4f}; wrote {args.out}")
    return 0
