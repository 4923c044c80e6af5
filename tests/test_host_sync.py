"""No host synchronisation per batch in the training, evaluation, generator and
distillation loops: on a GPU every ``.item()``, ``float(tensor)`` or ``.tolist()``
inside a loop stalls the device once per iteration.

A static check over the loop modules: inside any ``for``/``while`` body (or
comprehension) no ``float(...)``, ``int(...)``, ``bool(...)`` call and no
``.item()``, ``.tolist()``, ``.cpu()`` or ``.numpy()``. A read that happens once
per epoch or per logged step is allowed when its line says so with a
``# host read`` comment.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mosaic_flwr"

#: Modules whose loops run per batch or per step.
LOOP_MODULES = ("training.py", "kd/distill.py", "kd/generator.py", "kd/ensemble.py",
                "mosaic/meta.py", "mosaic/client.py", "baselines/dense.py",
                "baselines/fedcog.py", "baselines/feddf.py", "baselines/fedftg.py",
                "baselines/fedgen.py", "baselines/fedlgd.py", "baselines/spectral.py")
SYNC_FUNCTIONS = {"float", "int", "bool"}
SYNC_METHODS = {"item", "tolist", "cpu", "numpy"}
LOOPS = (ast.For, ast.While, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def host_reads_in_loops(source: str) -> list[str]:
    """``line: code`` of every call that reads a tensor on the host inside a loop."""
    lines = source.splitlines()
    found = []

    def visit(node: ast.AST, in_loop: bool) -> None:
        if isinstance(node, ast.Call) and in_loop:
            func = node.func
            if ((isinstance(func, ast.Name) and func.id in SYNC_FUNCTIONS)
                    or (isinstance(func, ast.Attribute) and func.attr in SYNC_METHODS)):
                line = lines[node.lineno - 1]
                if "# host read" not in line:
                    found.append(f"{node.lineno}: {line.strip()}")
        # The iterable of a for loop (or of a comprehension's first generator) is
        # evaluated once, before the loop.
        once = (node.iter if isinstance(node, ast.For)
                else node.generators[0].iter if isinstance(node, LOOPS[2:]) else None)
        for child in ast.iter_child_nodes(node):
            if child is once or (isinstance(child, ast.comprehension) and child.iter is once):
                visit(child if child is once else child.iter, in_loop)
                if child is not once:
                    for part in (child.target, *child.ifs):
                        visit(part, True)
                continue
            visit(child, in_loop or isinstance(node, LOOPS))

    visit(ast.parse(source), False)
    return found


@pytest.mark.parametrize("module", LOOP_MODULES)
def test_no_host_read_per_iteration(module):
    assert host_reads_in_loops((PACKAGE / module).read_text()) == []


def test_the_check_finds_per_batch_reads():
    source = """
for x in batches:
    total += float(loss.detach())
    n = [y.item() for y in x]
for epoch in range(3):
    log(float(total))  # host read: once per epoch
print(int(total))
"""
    assert [f.split(":")[0] for f in host_reads_in_loops(source)] == ["3", "4"]
