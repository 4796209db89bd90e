"""Print the shape of the package: lines per subpackage (and top-level module), the longest functions, and
the import arrows between them (a cycle is flagged: two arrows in opposite directions).

    python scripts/codemap.py [--top 10] [--root mergekit_warp]     (from the repository root)
"""

from __future__ import annotations

import argparse
import ast
from collections import Counter, defaultdict
from pathlib import Path


def package_of(module: str) -> str:
    """'mergekit_warp.rl.train' → 'rl'; a module directly in the package is its own unit ('errors')."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "(root)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--root", default="mergekit_warp")
    args = ap.parse_args()
    base = Path.cwd()
    root = base / args.root
    lines: Counter[str] = Counter()
    funcs: list[tuple[int, str]] = []
    arrows: defaultdict[tuple[str, str], set[str]] = defaultdict(set)
    for path in sorted(root.rglob("*.py")):
        module = ".".join(path.relative_to(base).with_suffix("").parts).removesuffix(".__init__")
        src = path.read_text()
        pkg = package_of(module)
        lines[pkg] += len(src.splitlines())
        tree = ast.parse(src)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs.append((node.end_lineno - node.lineno + 1, f"{module}.{node.name}"))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(args.root + "."):
                target = package_of(node.module)
                if target != pkg:
                    arrows[(pkg, target)].add(module.removeprefix(args.root + "."))
    print("lines per package")
    for pkg, n in sorted(lines.items(), key=lambda kv: -kv[1]):
        print(f"  {pkg:<10} {n:6d}")
    print(f"  {'total':<10} {sum(lines.values()):6d}")
    print("\nlongest functions (lines)")
    for n, name in sorted(funcs, reverse=True)[: args.top]:
        print(f"  {n:4d}  {name}")
    print("\nimport arrows between packages (importer → imported: importing modules)")
    for (a, b), mods in sorted(arrows.items()):
        back = " ← CYCLE" if (b, a) in arrows else ""
        print(f"  {a:>9} → {b:<9} {', '.join(sorted(mods))}{back}")


if __name__ == "__main__":
    main()
