"""The folders are the layers (kernels -> training loops -> stages -> search -> experiments -> face), and nothing
imports upward. Checked on the source with `ast`, so a lazy import inside a function counts too."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ant_ray"

# Lowest first. A module may import only from its own layer or below.
LAYERS = [
    ("kernels", ["ant_ray.registry", "ant_ray.plugin_options", "ant_ray.files", "ant_ray.commands",
                 "ant_ray.ant.clustering", "ant_ray.ant.clustering_costs",
                 "ant_ray.ant.affinity", "ant_ray.ant.affinity_stage", "ant_ray.mtl", "ant_ray.merge",
                 "ant_ray.diffusion", "ant_ray.data", "ant_ray.fid", "ant_ray.deme.projection", "ant_ray.training"]),
    ("config", ["ant_ray.config"]),
    ("loops", ["ant_ray.tracking", "ant_ray.evaluation", "ant_ray.evaluation_plan", "ant_ray.ant.train", "ant_ray.deme.finetune",
               "ant_ray.deme.ranges", "ant_ray.ant", "ant_ray.deme"]),
    ("stages", ["ant_ray.stages"]),
    ("search", ["ant_ray.search"]),
    ("experiments", ["ant_ray.experiments"]),
    ("face", ["ant_ray.cli", "ant_ray.api", "ant_ray.__main__", "ant_ray"]),
]


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("ant_ray"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ant_ray"):
            found.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:  # relative: resolve against the package
            base = module_name(path).split(".")
            if path.name != "__init__.py":
                base = base[:-1]
            base = base[: len(base) - (node.level - 1)]
            found.add(".".join(base + ([node.module] if node.module else [])))
    return found


def test_nothing_imports_upward():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        for imported in imports_of(path):
            if imported == "ant_ray" and LAYERS[layer_of(importer)][0] != "face":
                violations.append(f"{importer} imports the package root (the face); import the module instead")
                continue
            if layer_of(imported) > layer_of(importer):
                violations.append(f"{importer} ({LAYERS[layer_of(importer)][0]}) imports {imported} "
                                  f"({LAYERS[layer_of(imported)][0]})")
    assert not violations, "\n".join(violations)
