"""The package's shape: every public import still works, the applications sit in `experiments/` and nothing in the
library imports them, and the import graph of the package (module-level and function-level imports alike, read from
the sources with `ast`) has no circle."""
import ast
import importlib
import pathlib
import re
import subprocess
import sys

import pytest

import metricloss_kernels as mlk

PACKAGE = pathlib.Path(mlk.__file__).parent

# every public name of the package, by module (the names users and the committed docs import)
PUBLIC = {
    "metricloss_kernels": mlk.__all__,
    "metricloss_kernels.functional": [
        "proxy_nca_loss", "proxy_anchor_loss", "soft_triple_loss", "mpa_loss", "arcface_loss", "cosface_loss",
        "l2_softmax_loss", "regular_polytope_loss", "proxy_repel_loss", "contrastive_loss", "triplet_margin_loss",
        "lifted_structure_loss", "npairs_loss", "margin_loss", "multi_similarity_loss", "exponential_triplet_loss",
        "center_loss", "sub_center_arcface_loss"],
    "metricloss_kernels.metrics": ["recall_at_k", "precision_at_k", "map_at_k", "ndcg_at_k", "map_at_r",
                                   "r_precision", "nmi", "normalized_mutual_info", "closest_center_accuracy",
                                   "range_accuracy", "evaluate", "select_metrics", "PML_NAMES"],
    "metricloss_kernels.lse": ["LSESpec", "class_lse"],
    "metricloss_kernels.distributed": ["class_range", "gather_state_dict", "shard_state_dict", "note_collective",
                                       "CommunicationLog"],
    "metricloss_kernels.retrieval": ["knn", "has_extension"],
    "metricloss_kernels.samplers": ["MPerClassSampler"],
    "metricloss_kernels.normalize": ["unit_range", "unit_bounce"],
    "metricloss_kernels.polytopes": ["regular_polytope", "polytope_margin"],
    "metricloss_kernels.reference": [],
    "metricloss_kernels.chunked": [],
    "metricloss_kernels.triton": ["forward", "backward", "is_available", "unavailable_reason"],
    "metricloss_kernels.experiments.tournament": ["main", "run_tournament"],
    "metricloss_kernels.experiments.tournament_report": ["REPORTED", "summary_table", "write_markdown"],
    "metricloss_kernels.experiments.bench": ["main"],
    "metricloss_kernels.experiments.claims": ["main"],
    "metricloss_kernels.experiments.demo": ["main"],
    "metricloss_kernels.claims": ["main"],
}
APPLICATION_ENTRIES = ("metricloss_kernels.experiments", "metricloss_kernels.__main__", "metricloss_kernels.claims")


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_imports(module):
    imported = importlib.import_module(module)
    missing = [name for name in PUBLIC[module] if not hasattr(imported, name)]
    assert not missing, f"{module} lacks {missing}"


def test_pml_public_imports():
    pytest.importorskip("pytorch_metric_learning")
    import metricloss_kernels.pml as pml
    assert all(hasattr(pml, name) for name in pml.__all__)
    assert {"AccuracyCalculator", "ProxyAnchorLoss", "SoftTripleLoss", "ArcFaceLoss"} <= set(pml.__all__)


def _modules():
    """{dotted name: (path, is_package)} for every source file of the package; the extension `_C` counts too."""
    mods = {"metricloss_kernels._C": (None, False)}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return mods


def import_graph():
    """{module: set of package modules it imports anywhere in its source}. `from pkg import name` counts as an
    import of pkg.name when that is a module, else of pkg."""
    mods = _modules()
    graph = {}
    for name, (path, is_package) in mods.items():
        if path is None:
            graph[name] = set()
            continue
        here = name.split(".") if is_package else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[:len(here) - node.level + 1] + [node.module] if node.level and node.module
                                else here[:len(here) - node.level + 1] if node.level else [node.module])
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names)
        graph[name] = {t for t in targets if t in mods and t != name}
    return graph


def _cycles(graph):
    """Every back edge of a depth-first search, as the circle it closes (empty for an acyclic graph)."""
    state, path, found = {}, [], []

    def visit(u):
        state[u] = "open"
        path.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                found.append(path[path.index(v):] + [v])
            elif v not in state:
                visit(v)
        path.pop()
        state[u] = "done"

    for u in sorted(graph):
        if u not in state:
            visit(u)
    return found


def test_no_import_circle():
    assert _cycles(import_graph()) == []


def test_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_library_never_imports_the_applications():
    graph = import_graph()
    library = [m for m in graph if not m.startswith(APPLICATION_ENTRIES)]
    upward = {m: sorted(t for t in graph[m] if t.startswith(APPLICATION_ENTRIES)) for m in library}
    assert not {m: t for m, t in upward.items() if t}


def test_applications_live_in_experiments():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert not top & {"tournament", "tournament_report", "demo", "training", "zoo", "datasets", "bench", "harness",
                      "_plots"}


def test_library_import_loads_no_application_dependency():
    code = ("import sys, metricloss_kernels, metricloss_kernels.functional, metricloss_kernels.metrics; "
            "print(sorted(m for m in ('matplotlib', 'sklearn.datasets', 'metricloss_kernels.experiments') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["-m", "metricloss_kernels", "claims", "--help"],
                                  ["-m", "metricloss_kernels.claims", "--help"]])
def test_claims_command(argv):
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "exp_triplet" in out.stdout


def test_documentation_links_stay_inside_the_repository():
    """README.md and docs/: every link and image is a relative path to a file of the repository."""
    root = PACKAGE.parent
    bad = []
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for match in re.finditer(r"\]\(([^)\s]+)\)|src=\"([^\"]+)\"", page.read_text()):
            target = (match.group(1) or match.group(2)).split("#")[0]
            if "://" in target or target.startswith("//") or (target and not (page.parent / target).exists()):
                bad.append(f"{page.name}: {target}")
    assert not bad


def test_readme_is_short():
    assert len((PACKAGE.parent / "README.md").read_text().splitlines()) <= 250
