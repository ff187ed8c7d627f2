"""Options shared by several commands: the model, the method and one option per registered knob."""

from __future__ import annotations

import re

from tokenbench.reduce.registry import get_method, knob_by_name, knob_owners


def add_model_options(p, default: str | None = "vit_digits", what: str = "the embedded vit_digits") -> None:
    p.add_argument("--model", default=default, help=f"timm ViT name (default: {what})")
    p.add_argument("--checkpoint", default=None, help="local weights file (read with weights_only=True)")
    p.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (needs the hub or its cache)")


def add_knob_options(p, many: bool, default_help: str) -> None:
    """One option per knob name of every registered method (`--keep`, `--r`, `--sample-rate`, ...); a knob
    several methods declare names them all, with the help text most of them give."""
    owners = knob_owners()
    for knob in knob_by_name().values():
        texts = [k.help for _, k in owners[knob.name]]
        text = max(set(texts), key=texts.count) if texts else knob.help
        names = [m for m, _ in owners[knob.name]]
        if len(names) > 1:  # every method that has it, not one method's name in the text
            text = f"{', '.join(names)}: " + re.sub(r"^[\w-]+: ", "", text)
        p.add_argument(knob.flag, dest=knob.name, default=None, metavar="V[,V...]" if many else "V",
                       help=f"{text} ({default_help})")


def given_knobs(args) -> dict[str, str]:
    """{knob name: text} of the knob options given on the command line."""
    return {name: getattr(args, name) for name in knob_by_name() if getattr(args, name, None) is not None}


def one_setting(method_name: str, args) -> dict:
    """One value per knob of the method: as given (checked by the method's own knob), else its first sweep value."""
    method = get_method(method_name)
    return method.check_knobs(method.parse_knobs(given_knobs(args)), default="sweep")
