"""The README's quick start is what the Makefile and CI run; the conda file matches the pip pins."""

import re
import tomllib

from helpers import REPO


def quick_start_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def makefile_targets() -> dict[str, str]:
    targets, current = {}, None
    for line in (REPO / "Makefile").read_text().splitlines():
        match = re.match(r"^([^\s:=]+):(?!=)", line)
        if match:
            current = match.group(1)
            targets[current] = ""
        elif current and line.startswith("\t"):
            targets[current] += line.strip() + "\n"
    return targets


def test_readme_quick_start_is_make_demo_and_make_test():
    assert quick_start_commands() == ["make demo", "make test"]


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    commands = [line.strip() for line in ci if line.strip() and not line.lstrip().startswith(("#", "set ", "cd ",
                                                                                              "export "))]
    assert commands == ["make test"]


def test_make_targets_install_then_run_the_entry_points():
    targets = makefile_targets()
    assert "pytest" in targets["test"] and "showcase.demo" in targets["demo"]
    install = targets["$(VENV)/.installed"]
    assert "torch==2.13.0" in install and ".[dev]" in install
    makefile = (REPO / "Makefile").read_text()
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        assert f"export {var} := 1" in makefile


def test_environment_yml_matches_pyproject_pins():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    conda = {line.strip()[2:] for line in (REPO / "environment.yml").read_text().splitlines()
             if line.startswith("      - ")}
    assert conda == pins


# ---------------------------------------------------------------- honest pins

DIST_TO_MODULE = {"hydra-core": "hydra", "flash-attn": "flash_attn"}  # where the import name differs


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]


def module_of(requirement: str) -> str:
    name = requirement_name(requirement)
    return DIST_TO_MODULE.get(name, name.lower().replace("-", "_"))


def third_party_imports(paths) -> set[str]:
    """Top-level modules imported by these files, less the standard library and this repository's own."""
    import ast
    import sys

    local = {p.stem for p in REPO.glob("*.py")} | {p.name for p in REPO.iterdir() if (p / "__init__.py").exists()}
    local |= {p.stem for p in (REPO / "tests").glob("*.py")}
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - local - {"__future__"}


def project_table() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_dependencies_declared_are_exactly_what_the_code_imports():
    """Every third-party import of the product code (entry points, package, showcase, tools) is a declared
    dependency or an optional `gpu` extra; every declared dependency is imported; tests add only `dev`."""
    project = project_table()
    core = {module_of(r) for r in project["dependencies"]}
    gpu = {module_of(r) for r in project["optional-dependencies"]["gpu"]}
    dev = {module_of(r) for r in project["optional-dependencies"]["dev"]}
    product = [*REPO.glob("*.py"), *(REPO / "feedbackalign").rglob("*.py"), *(REPO / "showcase").rglob("*.py"),
               *(REPO / "tools").rglob("*.py")]
    product_imports = third_party_imports(product)
    assert product_imports - core - gpu - {"trl"} == set()  # trl: the benchmark's comparison (dev)
    assert core - product_imports == set()
    assert third_party_imports((REPO / "tests").rglob("*.py")) - core - dev == set()
    assert "accelerate" not in core  # transformers' device_map (the 4-bit load) is its only user: the gpu extra


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.match(r"\d+(\.\d+)*", text).group(0).split("."))


def test_constraints_file_pins_each_dependency_at_or_above_its_minimum():
    project = project_table()
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    for requirement in project["dependencies"] + project["optional-dependencies"]["dev"]:
        name = requirement_name(requirement).lower()
        minimum = requirement.split(">=")[1]
        assert name in pins, f"{name} is not in constraints.txt"
        assert version_tuple(pins[name]) >= version_tuple(minimum), requirement
    assert version_tuple(requirement_name_min(project, "torch")) >= (2, 6)  # FSDP2's public API


def requirement_name_min(project, name):
    return next(r.split(">=")[1] for r in project["dependencies"] if requirement_name(r) == name)


def test_make_installs_the_tested_versions():
    install = makefile_targets()["$(VENV)/.installed"]
    assert "-c constraints.txt" in install
    assert "constraints.txt" in next(line for line in (REPO / "Makefile").read_text().splitlines()
                                     if line.startswith("$(VENV)/.installed:"))
