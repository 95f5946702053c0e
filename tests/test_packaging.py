"""Packaging: the declared dependencies, their Rust-freedom, entry points and layout.

The design card allows exactly these runtime dependencies, none built from Rust
(HPC sites build from source on odd platforms, often without a Rust toolchain).
The Rust checks look at what is really installed: each distribution's wheel
generator, and the shared objects its RECORD lists, for strings that Rust's
standard library puts in every binary it links.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent

#: The design card's runtime set, plus python-hostlist for Slurm node lists and
#: aiobotocore for the S3 origin (Ceph RGW).
RUNTIME_DEPENDENCIES = {
    "uvloop",
    "msgpack",
    "zstandard",
    "xxhash",
    "aiofiles",
    "python-hostlist",
    "aiobotocore",
}

#: Popular packages built from Rust (PyO3/maturin or setuptools-rust); none may
#: come in as a transitive runtime requirement.
KNOWN_RUST_PACKAGES = {
    "ast-serialize",
    "bcrypt",
    "cryptography",
    "granian",
    "jiter",
    "orjson",
    "ormsgpack",
    "polars",
    "pydantic-core",
    "rpds-py",
    "ruff",
    "safetensors",
    "tiktoken",
    "tokenizers",
    "uv",
    "watchfiles",
}

#: Build backends that compile Rust extensions.
RUST_GENERATORS = ("maturin", "setuptools-rust", "setuptools_rust")

#: Strings Rust's standard library leaves in any binary it links, stripped or not
#: (panic locations and the backtrace switch).
RUST_MARKERS = (b"RUST_BACKTRACE", b"library/core/src/")

CONSOLE_SCRIPTS = {"p2pcast": "p2pcast.cli:main", "p2pcastd": "p2pcast.cli:daemon_main"}

TOP_LEVEL_DIRS = ("p2pcast", "slurm", "tools", "bench", "tests", "systemd")


def normalize(name: str) -> str:
    """PEP 503 name normalization."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def declared_requirements() -> list[Requirement]:
    return [Requirement(r) for r in pyproject()["project"]["dependencies"]]


def runtime_closure() -> dict[str, md.Distribution]:
    """Every installed distribution the runtime dependencies need, transitively.

    Markers are evaluated for this interpreter, with the extras each
    requirement asks for (and none for the top-level ones).
    """
    seen: dict[str, md.Distribution] = {}
    todo: list[tuple[str, frozenset[str]]] = [
        (r.name, frozenset(r.extras)) for r in declared_requirements()
    ]
    visited: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        key = normalize(name)
        if (key, extras) in visited:
            continue
        visited.add((key, extras))
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            pytest.fail(f"runtime requirement {name} is not installed (run tools/setup.sh)")
        seen[key] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            applies = req.marker is None or any(
                req.marker.evaluate({"extra": extra}) for extra in {"", *extras}
            )
            if applies:
                todo.append((req.name, frozenset(req.extras)))
    return seen


def test_runtime_dependencies_are_the_design_card_set() -> None:
    names = [normalize(r.name) for r in declared_requirements()]
    assert sorted(names) == sorted(RUNTIME_DEPENDENCIES)
    assert len(names) == len(set(names)), "a runtime dependency is listed twice"


def test_runtime_dependencies_have_lower_bounds() -> None:
    for req in declared_requirements():
        assert any(s.operator == ">=" for s in req.specifier), f"{req} has no lower bound"
        assert req.marker is None and not req.extras, f"{req}: no markers or extras expected"


def test_installed_metadata_matches_pyproject() -> None:
    """A stale editable install (pyproject changed since) fails here, not later."""
    installed = {normalize(Requirement(r).name) for r in md.requires("p2pcast") or []}
    runtime = {n for n in installed if n in RUNTIME_DEPENDENCIES}
    assert runtime == RUNTIME_DEPENDENCIES, "re-run tools/setup.sh"


def test_requires_python_admits_this_interpreter() -> None:
    spec = SpecifierSet(pyproject()["project"]["requires-python"])
    assert spec.contains(f"{sys.version_info.major}.{sys.version_info.minor}")
    assert not spec.contains("3.12"), "the project targets Debian 12's Python 3.11 only"


def test_no_known_rust_package_among_runtime_requirements() -> None:
    closure = runtime_closure()
    assert set(RUNTIME_DEPENDENCIES) <= set(closure)
    assert not set(closure) & KNOWN_RUST_PACKAGES


def test_no_runtime_requirement_was_built_from_rust() -> None:
    for name, dist in sorted(runtime_closure().items()):
        wheel = dist.read_text("WHEEL") or ""
        generators = [
            line.split(":", 1)[1].strip().lower()
            for line in wheel.splitlines()
            if line.lower().startswith("generator:")
        ]
        for generator in generators:
            assert not generator.startswith(RUST_GENERATORS), f"{name}: built by {generator}"
        for file in dist.files or []:
            if file.suffix == ".so" or ".so." in file.name:
                found = rust_markers_in(Path(str(dist.locate_file(file))))
                assert not found, f"{name}: {file} looks Rust-built ({found})"


def rust_markers_in(path: Path) -> list[bytes]:
    data = path.read_bytes()
    return [marker for marker in RUST_MARKERS if marker in data]


def test_rust_marker_scan_is_not_vacuous(tmp_path: Path) -> None:
    rust = tmp_path / "rust.so"
    rust.write_bytes(b"\x7fELF..RUST_BACKTRACE..library/core/src/option.rs..")
    c_ext = tmp_path / "c.so"
    c_ext.write_bytes(b"\x7fELF..PyInit_c..GCC: (Debian 12.2.0-14) 12.2.0..")
    assert rust_markers_in(rust) == list(RUST_MARKERS)
    assert rust_markers_in(c_ext) == []


def test_console_scripts_are_declared() -> None:
    assert pyproject()["project"]["scripts"] == CONSOLE_SCRIPTS
    installed = {
        ep.name: ep.value
        for ep in md.distribution("p2pcast").entry_points
        if ep.group == "console_scripts"
    }
    assert installed == CONSOLE_SCRIPTS, "re-run tools/setup.sh"


def test_console_script_targets_exist() -> None:
    """Each target is a top-level function of its module (read, not imported)."""
    for target in CONSOLE_SCRIPTS.values():
        module, func = target.split(":")
        path = ROOT.joinpath(*module.split(".")).with_suffix(".py")
        if not path.exists():
            pytest.skip(f"{path.relative_to(ROOT)} is not written yet")
        tree = ast.parse(path.read_text(), str(path))
        names = {
            node.name
            for node in tree.body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        assert func in names, f"{target}: no top-level def {func}"


@pytest.mark.parametrize("name", TOP_LEVEL_DIRS)
def test_top_level_dir_exists(name: str) -> None:
    assert (ROOT / name).is_dir()


def test_every_package_dir_has_an_init() -> None:
    """setuptools' find_packages skips a directory without __init__.py: its
    modules would be missing from the wheel while tests pass in the work tree."""
    package = ROOT / "p2pcast"
    for directory in [package, *(p for p in package.rglob("*") if p.is_dir())]:
        if directory.name == "__pycache__" or not any(directory.glob("*.py")):
            continue
        assert (directory / "__init__.py").exists(), f"{directory.relative_to(ROOT)}"
