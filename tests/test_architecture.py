"""The layering docs/architecture.md describes, checked on the source itself so that it cannot drift.

Every ``import`` statement of the product is read with :mod:`ast` (lazy imports inside functions included), so a
stage that reaches into another stage, an engine that imports the agent, or a subscriber library that drags in
torch fails here with the offending module and line, before anyone reviews the change.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from sct_core.errors import SctError

ROOT = Path(__file__).resolve().parents[1]
#: The packages that are pipeline stages: each may use the shared modules but never another stage.
STAGES = ("ingest", "validation", "inference", "publish", "dicom_out")
#: Shared by every stage: records and vocabularies passed between them, the status events they publish, the
#: stage thread, the frozen configuration sections a stage is built from (read-only data, no service), and how
#: a file is named in logs and messages (never by its name).
SHARED = (
    "agent.records",
    "agent.vocabulary",
    "agent.status_events",
    "agent.stage_thread",
    "agent.ops.config",
    "agent.file_labels",
)
#: What the subscriber library may import of the product (the wire format, key files, endpoints, geometry).
CLIENT_ALLOWED = (
    "agent.client",
    "agent.publish.wire",
    "agent.publish.curve_keys",
    "agent.publish.endpoints",
    "agent.records",
    "agent.vocabulary",
    "sct_core",
)
#: A module longer than this states, in its docstring, why it is one module (see :func:`test_long_modules`).
MAX_LINES = 500
LONG_MODULE_MARKER = "One module on purpose:"


def _modules(*packages: str) -> Iterator[tuple[str, Path]]:
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


def _imports(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """Every module ``path`` imports, absolute, with the line it is imported on."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level + (1 if path.name == "__init__.py" else 0) or None]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield target, node.lineno
            for alias in node.names:  # ``from agent.cli import check`` imports the module agent.cli.check
                yield f"{target}.{alias.name}", node.lineno


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "agent" and parts[1] in STAGES else None


def _stage_imports() -> Iterator[tuple[str, str, str]]:
    """(where, importing stage, imported module) for every import made inside a stage package."""
    for module, path in _modules("agent"):
        own = _stage_of(module)
        if own is not None:
            for target, line in _imports(module, path):
                yield f"{path.relative_to(ROOT)}:{line}", own, target


def test_no_stage_imports_another_stage() -> None:
    offences = [
        f"{where}: stage {own} imports {target} (stage {_stage_of(target)})"
        for where, own, target in _stage_imports()
        if _stage_of(target) not in (None, own)
    ]
    assert not offences, "\n".join(offences)


def test_stages_use_only_shared_agent_modules() -> None:
    """A stage may import its own package and the shared records; ops, cli, pipeline and client are above it."""
    offences = [
        f"{where}: stage {own} imports {target}"
        for where, own, target in _stage_imports()
        if _within(target, "agent")
        and target != "agent"
        and _stage_of(target) is None
        and not any(_within(target, shared) for shared in SHARED)
    ]
    assert not offences, "\n".join(offences)


@pytest.mark.parametrize("package", ["engines", "sequence_protocols", "sct_core"])
def test_lower_layers_never_import_the_agent(package: str) -> None:
    forbidden = ("agent",) if package != "sct_core" else ("agent", "engines", "torch")
    offences = [
        f"{path.relative_to(ROOT)}:{line}: imports {target}"
        for module, path in _modules(package)
        for target, line in _imports(module, path)
        if any(_within(target, name) for name in forbidden)
    ]
    assert not offences, "\n".join(offences)


def test_subscriber_library_imports_only_what_a_robot_installs() -> None:
    """pyzmq, numpy and the standard library: the modules the client reaches, followed transitively."""
    seen: set[str] = set()
    pending = ["agent.client"]
    offences = []
    paths = dict(_modules("agent", "sct_core"))
    while pending:
        module = pending.pop()
        if module in seen or module not in paths:
            continue
        seen.add(module)
        for target, line in _imports(module, paths[module]):
            top = target.split(".")[0]
            if top in ("agent", "sct_core", "engines"):
                if target in paths and not any(_within(target, allowed) for allowed in CLIENT_ALLOWED):
                    offences.append(f"{paths[module].relative_to(ROOT)}:{line}: {module} imports {target}")
                pending.append(target)
            elif top in ("torch", "engines", "pydicom", "scipy", "watchdog", "prometheus_client", "PIL"):
                offences.append(f"{paths[module].relative_to(ROOT)}:{line}: {module} imports {target}")
    assert "agent.publish.wire" in seen, "the walk must reach the wire format the client decodes"
    assert not offences, "\n".join(offences)


def test_long_modules_say_why() -> None:
    long = []
    for _, path in _modules("agent", "engines", "sct_core", "bench"):
        lines = path.read_text().count("\n")
        if lines <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if LONG_MODULE_MARKER not in doc:
            long.append(
                f"{path.relative_to(ROOT)}: {lines} lines, no '{LONG_MODULE_MARKER}' in its docstring"
            )
    assert not long, "\n".join(long)


def test_nothing_cites_files_outside_the_repository() -> None:
    """The repository explains itself: no module or document points a reader at a file a clone does not have."""
    outside = ("DESIGN.md", "physics.md", "style.md", "environment.md", "CATALOG.md", "shared/reference")
    offences = []
    for path in sorted(ROOT.rglob("*")):
        relative = path.relative_to(ROOT)
        if (
            not path.is_file()
            or relative.parts[0] in (".git", ".venv")
            or path.suffix not in (".py", ".md", ".toml")
        ):
            continue
        if relative == Path("tests/test_architecture.py") or "egg-info" in str(relative):
            continue
        text = path.read_text()
        offences += [f"{relative}: cites {name}" for name in outside if name in text]
    assert not offences, "\n".join(offences)


def test_every_product_error_shares_one_root() -> None:
    """Every exception class the product defines derives from SctError, so it names attribute, found, expected."""
    offences = []
    for module_name, path in _modules("agent", "engines", "sct_core"):
        if module_name.endswith("__main__"):
            continue
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if (
                isinstance(value, type)
                and issubclass(value, BaseException)
                and value.__module__ == module_name
                and not issubclass(value, SctError)
            ):
                offences.append(f"{path.relative_to(ROOT)}: {name} does not derive from SctError")
    assert not offences, "\n".join(offences)
