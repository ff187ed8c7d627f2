"""The author surface's reference, generated from the code itself, so that the guide cannot drift from it.

docs/writing-a-method.md embeds `surface_reference()` between markers and a test keeps the two equal;
`python -m tokenbench.reduce.reference` prints it.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

import tokenbench.reduce as surface

ORDER = ["Method", "Knob", "keep_rate_knob", "register_method", "TokenReducedViT", "TokenReducer", "Need", "Position",
         "TokenState", "AttentionInfo", "Decision", "Prune", "Merge", "Propagate", "Gate", "KeepRateReducer",
         "keep_count", "stage_counts", "default_reduction_blocks", "reduction_stages", "gather_tokens", "with_prefix",
         "run_attention", "mean_attention_received", "classify", "active_ledger", "CostLedger", "BlockCost", "embed_macs",
         "linear_macs_per_token", "norm_macs_per_token", "tensor_digest", "parameter_versions", "BenchError"]


def class_outline(cls: type) -> str:
    """The class line, its class-level fields as written (with their comments) and its public methods' signatures."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    node = ast.parse(source).body[0]
    bases = ", ".join(ast.unparse(b) for b in node.bases)
    out = [f"class {cls.__name__}({bases}):" if bases else f"class {cls.__name__}:"]
    for item in node.body:
        if isinstance(item, (ast.Assign, ast.AnnAssign)):
            start = item.lineno - 1
            while lines[start - 1].strip().startswith("#"):  # the comment above a field belongs to it
                start -= 1
            out += lines[start:item.end_lineno]
        elif isinstance(item, ast.FunctionDef) and (not item.name.startswith("_") or item.name == "__init__"):
            out += [f"    @{ast.unparse(d)}" for d in item.decorator_list] + [f"    {def_line(item)}"]
            doc = ast.get_docstring(item)
            if doc:
                out.append(textwrap.indent(f'"""{doc.split(chr(10) + chr(10))[0]}"""', " " * 8))
    return "\n".join(out)


def def_line(node: ast.FunctionDef) -> str:
    returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    return f"def {node.name}({ast.unparse(node.args)}){returns}: ..."


def entry(name: str) -> str:
    obj = getattr(surface, name)
    if inspect.isclass(obj):
        outline = class_outline(obj)
    else:
        outline = def_line(ast.parse(textwrap.dedent(inspect.getsource(obj))).body[0])
    doc = inspect.getdoc(obj) or ""
    return f"### `{name}`\n\n{doc}\n\n```python\n{outline}\n```\n"


def surface_reference() -> str:
    """Markdown: every name `tokenbench.reduce` exports, with its docstring, signature and fields."""
    missing = sorted(set(surface.__all__) - set(ORDER))
    if missing:
        raise AssertionError(f"the reference does not place {missing}")
    return "\n".join(entry(name) for name in ORDER)


if __name__ == "__main__":
    print(surface_reference(), end="")
