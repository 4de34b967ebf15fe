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
