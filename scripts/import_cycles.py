"""Print the import circles of the raymix package (module level, with
imports inside functions counted; imports under ``TYPE_CHECKING`` not).

    .venv/bin/python scripts/import_cycles.py [SOURCE_ROOT]

SOURCE_ROOT (default: this checkout) is the folder that holds ``raymix/``;
another checkout's tree works too (how the circles before a change are
counted). The graph is read by grimp, the library behind import-linter;
circles are its strongly connected components of more than one module.
Exit code 1 when there is any.
"""

from __future__ import annotations

import sys
from pathlib import Path


def import_cycles(package: str = "raymix") -> list[list[str]]:
    """The strongly connected components (more than one module) of the
    package's import graph, each sorted, largest first."""
    import grimp

    graph = grimp.build_graph(package, exclude_type_checking_imports=True)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in sorted(graph.modules)}
    # Tarjan's algorithm, iterative (no recursion limit on deep chains).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            succ = edges.get(node, [])
            if i < len(succ):
                work.append((node, i + 1))
                nxt = succ[i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    components.append(sorted(comp))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return sorted(components, key=len, reverse=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0]).resolve() if argv else Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    cycles = import_cycles()
    for comp in cycles:
        print(f"{len(comp)} modules: {', '.join(comp)}")
    print(f"{len(cycles)} import circle(s) in {root / 'raymix'}")
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
