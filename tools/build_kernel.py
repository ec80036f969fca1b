"""Build kernel.py, the one file a Kaggle user uploads, from the package's own modules.

    python tools/build_kernel.py           # write kernel.py
    python tools/build_kernel.py --check   # exit 1 if the committed kernel.py is out of date

Every fact (registry, loader, heads, stackers, clip bounds) stays written once, in the package;
this script only concatenates modules in dependency order, hoists and de-duplicates their
imports, drops imports of our own packages and the per-module ``__main__`` blocks, and puts the
settings block of ``stacking/kaggle.py`` at the top. Two modules defining the same top-level name
differently is an error, since one would silently replace the other.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OURS = ("features", "oof", "stacking")
MODULES = [
    "features/defaults.py", "features/registry.py", "features/efficientnet_lite.py", "features/model_files.py",
    "features/models.py", "features/imagenet.py", "features/images.py",
    "features/task.py", "features/photos.py", "features/layouts.py", "features/data.py", "features/cache.py", "features/shards.py", "features/runtime.py", "features/quantize.py",
    "features/extract.py", "features/activations.py",
    "oof/folds.py", "oof/heads.py", "oof/prior.py", "oof/crossfit.py", "oof/finetune.py", "oof/store.py",
    "stacking/submission.py", "stacking/stackers.py", "stacking/ensemble.py", "stacking/report.py",
    "stacking/run.py", "stacking/kaggle.py",
]
# Command-line entry points of modules other than the kernel's own.
DROP = {"features/extract.py": {"main"}}
SETTINGS = re.compile(r"# --- settings ---\n(.*?)# --- end settings ---\n", re.S)
_OWN_IMPORT = re.compile(r"^\s+from (%s)(\.\w+)* import [\w, ]+\n" % "|".join(OURS), re.M)


def _is_ours(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom):
        return (node.module or "").split(".")[0] in OURS
    return isinstance(node, ast.Import) and any(a.name.split(".")[0] in OURS for a in node.names)


def _is_main_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)


def _defined(node: ast.AST) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [t.id for t in targets if isinstance(t, ast.Name)]
    return []


def build() -> str:
    imports: dict[str, None] = {}
    from_imports: dict[str, dict[str, None]] = {}
    bodies: list[str] = []
    seen: dict[str, tuple[str, str]] = {}
    settings = ""
    for rel in MODULES:
        source = (REPO / rel).read_text()
        match = SETTINGS.search(source)
        if match:
            settings = match.group(1)
            source = source.replace(match.group(0), "")
        tree = ast.parse(source)
        lines = source.splitlines(keepends=True)
        body = tree.body
        doc = ""
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
            doc = "".join(f"# {l}".rstrip() + "\n" for l in ast.get_docstring(tree).splitlines()[:1])
            body = body[1:]
        out = [f"\n\n# {'=' * 20} {rel} {'=' * 20}\n", doc]
        start = body[0].lineno - 1 if body else 0
        # A node's segment runs from the end of the previous node: the comments and blank lines
        # above it go (or stay) with it.
        for node in body:
            segment = "".join(lines[start:node.end_lineno])
            start = node.end_lineno
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                if isinstance(node, ast.ImportFrom) and node.module != "__future__" and not _is_ours(node):
                    names = from_imports.setdefault(node.module, {})
                    names.update({ast.unparse(a): None for a in node.names})
                elif isinstance(node, ast.Import) and not _is_ours(node):
                    imports[ast.unparse(node)] = None
                continue
            if _is_main_block(node) or set(_defined(node)) & DROP.get(rel, set()):
                continue
            for name in _defined(node):
                text = ast.unparse(node)
                if name in seen and seen[name][1] != text:
                    raise SystemExit(f"build_kernel: '{name}' is defined in both {seen[name][0]} and {rel}")
                if name in seen:
                    segment = ""
                seen[name] = (rel, text)
            out.append(segment)
        bodies.append(_OWN_IMPORT.sub("", "".join(out)))
    # The settings go to the top of the file: a module defining one of their names would silently
    # replace the user's setting (it happened: the registry's table replaced BACKBONES).
    for node in ast.parse(settings).body:
        for name in _defined(node):
            if name in seen:
                raise SystemExit(f"build_kernel: setting '{name}' is also defined in {seen[name][0]}")
    version = re.search(r'__version__ = "([^"]+)"', (REPO / "features/__init__.py").read_text()).group(1)
    header = (
        '"""gapstack kernel: Dogs vs. Cats Redux with GAP features of pretrained CNNs, out-of-fold\n'
        'heads, concat-fusion and stacking. Upload this one file to a Kaggle notebook and run it.\n\n'
        "GENERATED by tools/build_kernel.py from the gapstack package; do not edit by hand.\n"
        '"""\n\nfrom __future__ import annotations\n\n'
        f"{settings}\n"
        + "\n".join(sorted(imports)) + "\n"
        + "\n".join(f"from {m} import {', '.join(sorted(n))}" for m, n in sorted(from_imports.items()))
        + "\n\n"
        f'__version__ = "{version}"\n'
    )
    # A notebook cell runs as __main__ too: a successful run ends quietly there (SystemExit(0)
    # would print a traceback-like message), a failed one still stops with its exit code.
    footer = ('\n\nif __name__ == "__main__":\n    _code = kaggle_main(own_argv())\n'
              "    if _code:\n        sys.exit(_code)\n")
    text = header + "".join(bodies).rstrip() + "\n" + footer
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    compile(text, "kernel.py", "exec")
    return text


def edit_settings(source: str, **settings) -> str:
    """kernel.py with its settings edited as a user edits them: each ``NAME = value`` line."""
    for name, value in settings.items():
        line = re.search(rf"^{name} = .*$", source, re.M)
        if not line:
            raise KeyError(f"no setting {name} in kernel.py")
        source = source[:line.start()] + f"{name} = {value!r}" + source[line.end():]
    return source


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if kernel.py differs from a fresh build")
    args = parser.parse_args()
    text = build()
    target = REPO / "kernel.py"
    if args.check:
        if not target.exists() or target.read_text() != text:
            print("kernel.py is out of date: run python tools/build_kernel.py", file=sys.stderr)
            return 1
        return 0
    target.write_text(text)
    print(f"wrote {target} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
