"""Imports run one way (ARCHITECTURE.md "Layers"; README "Layout"): vocabulary, core,
runtime, edge, from the bottom up. Every import in the source, function-local ones
included, is parsed here (ast, nothing imported) and checked against the layer table."""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("proto", "controller", "workers", "loadgen")

# Module prefix -> layer; the longest matching prefix wins.
LAYER_OF_PREFIX = {
    "controller": 2,  # the package itself imports nothing
    "proto": 1,  # vocabulary: contracts, tiers, names, registry, metric catalogue, config schema
    "controller.policy": 2,  # core: pure, clock-injected
    "controller.autoscale.policy": 2,
    "loadgen": 2,  # core: trace model, simulator
    "controller.runtime": 3,  # runtime: controller actor, membership, mover
    "controller.autoscale": 3,
    "workers": 3,  # runtime: the data plane
    "loadgen.replay": 3,  # the closed-loop replayer does I/O against a live platform
    "loadgen.clients": 3,
    "controller.gateway": 4,  # edge
    "controller.assembly": 4,
    "controller.cli": 4,
}
LAYER_NAMES = {1: "vocabulary", 2: "core", 3: "runtime", 4: "edge"}
# Parts of one layer never import each other, except these (importer prefix, imported prefix).
SAME_LAYER_ALLOWED = {
    ("loadgen.sim", "controller.policy"),  # the simulator drives the very policy core the controller runs
}
# The controller and the workers talk through proto/ contracts and Ray handles, never by
# importing each other (ARCHITECTURE.md "Layers"), whatever the layers allow.
NEVER = (("workers", "controller"), ("controller.runtime", "workers"), ("controller.autoscale", "workers"),
         ("controller.policy", "workers"))
# The core reads no clock of its own and touches no cluster: none of these.
CORE_FORBIDDEN = ("ray", "grpc", "httpx", "vllm", "redis", "fastapi", "starlette")


@dataclass(frozen=True)
class Import:
    importer: str  # module name
    line: int
    target: str  # module name imported
    names: tuple[str, ...]  # for `from X import a, b`


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def imports_of(path: Path) -> list[Import]:
    importer = module_name(path)
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(importer, node.lineno, alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append(Import(importer, node.lineno, target, tuple(a.name for a in node.names)))
    return found


def prefix_of(module: str, table) -> str | None:
    matches = [p for p in table if module == p or module.startswith(p + ".")]
    return max(matches, key=len) if matches else None


def layer(module: str) -> int | None:
    prefix = prefix_of(module, LAYER_OF_PREFIX)
    return None if prefix is None else LAYER_OF_PREFIX[prefix]


def top_package(module: str) -> str:
    return module.split(".")[0]


def violations(files: list[Path]) -> list[str]:
    found = []
    for path in files:
        for imp in imports_of(path):
            if top_package(imp.target) in CORE_FORBIDDEN and layer(imp.importer) == 2:
                found.append(f"{imp.importer}:{imp.line} core imports {imp.target} (the core does no I/O)")
            dst = layer(imp.target)
            if dst is None:
                continue  # a third-party or standard module
            src = layer(imp.importer)
            where = f"{imp.importer}:{imp.line} imports {imp.target}"
            if src is None:
                found.append(f"{where}: {imp.importer} has no layer in LAYER_OF_PREFIX")
            elif dst > src:
                found.append(f"{where}: {LAYER_NAMES[src]} imports {LAYER_NAMES[dst]} (upward)")
            elif dst == src and top_package(imp.target) != top_package(imp.importer) and not any(
                    prefix_of(imp.importer, [a]) and prefix_of(imp.target, [b]) for a, b in SAME_LAYER_ALLOWED):
                found.append(f"{where}: two parts of the {LAYER_NAMES[src]} layer import each other")
            if any(prefix_of(imp.importer, [a]) and prefix_of(imp.target, [b]) for a, b in NEVER):
                found.append(f"{where}: the controller and the workers never import each other")
            private = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
            if private and imp.target != imp.importer:
                found.append(f"{where}: private name(s) {', '.join(private)} imported across modules")
    return found


def test_every_module_has_a_layer():
    missing = [module_name(p) for p in source_files() if layer(module_name(p)) is None]
    assert not missing, f"add these to LAYER_OF_PREFIX: {missing}"


def test_imports_run_downward_only():
    found = violations(source_files())
    assert not found, "imports against the layers:\n" + "\n".join(found)


@pytest.mark.parametrize(("importer", "source", "expected"), [
    ("workers/fake.py", "from controller.policy.types import Tier\n", "never import each other"),
    ("workers/fake.py", "def f():\n    from controller.runtime import live\n", "two parts of the runtime layer"),
    ("proto/fake.py", "from controller.policy import PlannerConfig\n", "vocabulary imports core (upward)"),
    ("controller/policy/fake.py", "import ray\n", "core imports ray"),
    ("loadgen/fake.py", "from controller.cli.args import positive_int\n", "core imports edge (upward)"),
    ("controller/cli/fake.py", "from controller.cli.traces import _positive\n", "private name(s) _positive"),
])
def test_the_check_catches_a_wrong_import(tmp_path, monkeypatch, importer, source, expected):
    """The check is not vacuous: a planted wrong import is reported."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    path = tmp_path / importer
    path.parent.mkdir(parents=True)
    path.write_text(source)
    found = violations([path])
    assert any(expected in v for v in found), found


def test_a_downward_import_passes(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    path = tmp_path / "controller" / "cli" / "fake.py"
    path.parent.mkdir(parents=True)
    path.write_text("from workers.engine import EngineSettings\nfrom proto.tiers import Tier\n")
    assert violations([path]) == []
