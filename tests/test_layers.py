"""The import graph of galaxy_llava, read from the source (AST, no import): every import counted
(function-level ones too); no import cycle, toy/ included; no product module imports toy/ but the
command-line face; no module imports one of a higher layer (docs/DESIGN.md's order, LAYERS
below) but the few exceptions named with their reason; an import inside a function only where
it saves a heavy library's import time (HEAVY below), so the module-level imports show the real
dependencies."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "galaxy_llava"
FACE = {"galaxy_llava.cli.toy"}  # the command line's toy commands (synth, tiny-model, demo)
# docs/DESIGN.md's layers, top to bottom: a module imports only its own layer and those below.
# Every module is placed (a new one must be), a package by its prefix.
LAYERS = [
    ["cli", "__main__"],  # the command line: cli/ (a module per group of commands)
    ["toy"],  # the demo's and the tests' parts, beside the product; only the face imports them
    ["report", "report_charts", "report_galaxies"],
    ["probe"],
    ["evaluate"],
    ["serve"],
    ["survey_catalogue", "survey_catalogue_folder"],
    ["training"],
    ["saving"],
    ["generate", "scoring"],
    ["modelcard"],
    ["models"],
    ["prepare", "hub_dataset", "gz2_catalog", "layouts"],
    ["calibration", "metrics"],
    ["vote_captions", "rules", "morphology", "gz2"],
    ["records", "imagefiles", "fitscutouts"],
    ["outputs", "checks", "run_layout"],
    ["config", "errors", "io", ""],  # "": the package's __init__ (its version)
]
# Imports that go up, each with its reason (the test fails once one is gone, so the list shrinks).
UPWARD: dict[tuple[str, str], str] = {}
# Cycles there are today, each to be broken (the test fails once one is, so the list shrinks).
KNOWN_CYCLES: list[set[str]] = []
# Libraries whose import costs over ~50 ms: a module that imports one at module level (itself or
# through the package's modules it imports there) is heavy, and only a heavy module of the package
# may be imported inside a function. Measured on 2026-12-06 (2 shared CPU cores), the cumulative
# time of the library's own line, best of 3, with
#   python -X importtime -c "import LIB" 2>&1 | grep -E "\| LIB$"
# torch 1559 ms, transformers 729, peft 3950 (it imports torch and transformers), accelerate 1240,
# gradio 2930, galsim 611, datasets 827, pandas 335, pyarrow 127, astropy 170, matplotlib 234,
# sklearn 989, scipy 104, numpy 70-102, tqdm 57-83. Light: PIL.Image 32-47, yaml 21-29,
# huggingface_hub 14.
HEAVY = {"torch", "transformers", "peft", "accelerate", "gradio", "galsim", "datasets", "pandas",
         "pyarrow", "astropy", "matplotlib", "sklearn", "scipy", "numpy", "tqdm"}


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """``{module: the package's modules it imports}``, at module level or in a function."""
    modules = {_module_name(p, package): p for p in package.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found |= set(_targets(node, modules, name))
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _targets(node: ast.Import | ast.ImportFrom, modules, name: str) -> list[str]:
    """The modules an import statement of module ``name`` names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    assert node.level == 0, f"{name}: relative import of {node.module}"
    # `from galaxy_llava.toy import tiny` imports a module; `from x import f` x
    return [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
            for a in node.names]


def imports_by_place(package: Path = PACKAGE):
    """``({module: what it imports at module level}, [(module, function, line, target), ...]
    for each import inside a function)``, every import named in full (libraries too); imports
    under ``if TYPE_CHECKING:`` are for annotations only and left out."""
    modules = {_module_name(p, package): p for p in package.rglob("*.py")}
    top, inner = {m: set() for m in modules}, []

    def visit(name, node, function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _targets(child, modules, name):
                    if function:
                        inner.append((name, function, child.lineno, target))
                    else:
                        top[name].add(target)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(name, child, function or child.name)
            elif not (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)):
                visit(name, child, function)

    for name, path in modules.items():
        visit(name, ast.parse(path.read_text(), str(path)), None)
    return top, inner


def heavy_libraries(module: str, top: dict[str, set[str]], seen=None) -> set[str]:
    """The HEAVY libraries importing ``module`` imports: its own module-level imports, those of
    the package's modules it imports there, and of its parent packages."""
    seen = set() if seen is None else seen
    found = set()
    parents = [module.rsplit(".", k)[0] for k in range(1, module.count(".") + 1)]
    for target in sorted(top[module]) + [p for p in parents if p in top]:
        if target in top:
            if target not in seen:
                seen.add(target)
                found |= heavy_libraries(target, top, seen)
        elif set(target.split(".")) & HEAVY:  # safetensors.torch imports torch
            found.add(target.split(".")[0])
    return found


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while not component or v not in component:
                component.add(stack.pop())
            on_stack.difference_update(component)
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_graph_sees_every_kind_of_import(graph):
    """The reader finds module-level, function-level and `from package import module` imports
    (else the checks below would pass on an empty graph)."""
    assert "galaxy_llava.toy.bpe" in graph["galaxy_llava.toy.tiny"]  # module level
    assert "galaxy_llava.toy.pretrain" in graph["galaxy_llava.toy.bpe"]  # in a function
    assert "galaxy_llava.toy.tiny_qwen2_vl" in graph["galaxy_llava.toy.tiny"]  # from toy import
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_import_cycle_toy_included(graph):
    found = cycles(graph)
    new = [sorted(c) for c in found if c not in KNOWN_CYCLES]
    assert not new, f"import cycles: {new}"
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in found]
    assert not gone, f"broken at last, remove from KNOWN_CYCLES: {gone}"


def test_no_product_module_imports_the_toy_parts(graph):
    product = {m for m in graph if not m.startswith("galaxy_llava.toy")} - FACE
    leaks = {m: sorted(t for t in graph[m] if t.startswith("galaxy_llava.toy")) for m in product}
    assert not {m: t for m, t in leaks.items() if t}


def layer_of(module: str) -> int:
    """The index in LAYERS of ``module``'s layer (0 the top)."""
    name = module.removeprefix("galaxy_llava").removeprefix(".")
    for i, layer in enumerate(LAYERS):
        if any(name == m or (m and name.startswith(m + ".")) for m in layer):
            return i
    raise AssertionError(f"{module} is in no layer: place it in tests/test_layers.py's LAYERS "
                         "and docs/DESIGN.md's picture")


def test_every_module_has_a_layer(graph):
    for module in graph:
        layer_of(module)


def test_no_module_imports_a_higher_layer(graph):
    upward = {(m, t) for m, targets in graph.items() for t in targets
              if layer_of(t) < layer_of(m)}
    new = sorted(upward - set(UPWARD))
    assert not new, f"imports of a higher layer (see docs/DESIGN.md): {new}"
    gone = sorted(set(UPWARD) - upward)
    assert not gone, f"no longer imported upward, remove from UPWARD: {gone}"


def test_models_import_nothing_above_them(graph):
    """The family seam: models/ knows no CLI, no training, no description."""
    models = [m for m in graph if m.startswith("galaxy_llava.models")]
    assert len(models) > 5
    for m in models:
        assert all(layer_of(t) >= layer_of("galaxy_llava.models") for t in graph[m]), m


def layer_label(layer: list[str]) -> str:
    """A layer's name in the picture: its modules, packages with a slash."""
    names = [m + "/" if (PACKAGE / m).is_dir() else m for m in layer if m]
    return ", ".join(names) if any(layer) else "__init__"


def layer_picture(graph: dict[str, set[str]]) -> str:
    """docs/DESIGN.md's picture (a Mermaid flowchart, drawn by GitHub and most Markdown
    viewers): one box per layer, top to bottom, and an arrow where a layer imports from a lower
    one that no other arrow path already reaches (the transitive reduction), so the picture
    shows the real dependencies without a thicket of arrows."""
    edges = {(layer_of(m), layer_of(t)) for m, targets in graph.items() for t in targets
             if layer_of(m) != layer_of(t)}
    below = {i: {j for a, j in edges if a == i} for i in range(len(LAYERS))}

    def reaches(start: int, goal: int, skip: tuple[int, int]) -> bool:
        todo, seen = [start], set()
        while todo:
            i = todo.pop()
            for j in below[i]:
                if (i, j) != skip and j not in seen:
                    if j == goal:
                        return True
                    seen.add(j)
                    todo.append(j)
        return False

    kept = sorted(e for e in edges if not reaches(*e, skip=e))
    lines = ["```mermaid", "flowchart TD"]
    lines += [f'  L{i}["{layer_label(layer)}"]' for i, layer in enumerate(LAYERS)]
    lines += [f"  L{a} --> L{b}" for a, b in kept]
    return "\n".join(lines + ["```"])


def test_the_design_documents_picture_is_the_import_graph(graph):
    """The picture in docs/DESIGN.md is drawn from the code: it fails when an import changes
    the layers' dependencies, and prints the picture to paste."""
    design = (PACKAGE.parents[1] / "docs" / "DESIGN.md").read_text()
    want = layer_picture(graph)
    assert want in design, f"docs/DESIGN.md's picture is out of date; paste:\n{want}"


@pytest.fixture(scope="module")
def places():
    return imports_by_place()


def test_heavy_modules_are_told_apart(places):
    """The measure the next test relies on: a module that imports torch (at module level, or
    through the package's modules) is heavy; the domain and the output contract are light."""
    top, inner = places
    assert "torch" in heavy_libraries("galaxy_llava.models.loading", top)
    assert "torch" in heavy_libraries("galaxy_llava.generate", top)  # through models.encoding
    for light in ("galaxy_llava.config", "galaxy_llava.rules", "galaxy_llava.outputs",
                  "galaxy_llava.models.folders", "galaxy_llava.models.preflight"):
        assert not heavy_libraries(light, top), light
    assert ("galaxy_llava.toy.bpe", "tokenizer_corpus", "galaxy_llava.toy.pretrain") in {
        (m, function, target) for m, function, _, target in inner}  # an import in a function


def test_function_level_imports_are_of_heavy_modules_only(places):
    """An import of the package's own module sits inside a function only where that module
    imports a heavy library (torch, transformers, gradio, ...: HEAVY); else it is at module level,
    so the import graph shows the real dependencies. (No cycle can force one inside: the full
    graph has none, see test_no_import_cycle_toy_included.)"""
    top, inner = places
    light = sorted(f"{m}.{function} (line {line}) imports {target}"
                   for m, function, line, target in inner
                   if target in top and target != m and not heavy_libraries(target, top))
    assert not light, "import these at module level (they import no heavy library):\n" + \
        "\n".join(light)


def test_the_command_line_imports_no_heavy_library_at_module_level(places):
    """`galaxy-llava --help` and every `galaxy-llava COMMAND --help` but train's (its flags come
    from transformers the first time, then from a cache: test_training_arguments) import none of
    HEAVY: the handlers import the heavy modules when they run."""
    top, _ = places
    for face in sorted(m for m in top if m in FACE or m.startswith("galaxy_llava.cli.")):
        assert not heavy_libraries(face, top), face
