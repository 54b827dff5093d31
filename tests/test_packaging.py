"""The package installs beside others: compatible ranges in pyproject.toml, the exact versions
`make` installs in constraints.txt (each inside its range), the server, plotting and data-cleaning
dependencies in extras, and a clear error naming the extra when one is missing."""

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from spdecode.runtime.errors import EXTRAS, SpdError, require_extra

ROOT = Path(__file__).resolve().parents[1]


def project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def constraints() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[name.lower().replace("_", "-")] = version
    return out


def test_pyproject_pins_nothing_exactly_and_constraints_pin_everything_inside_the_ranges():
    p = project()
    reqs = [Requirement(r) for r in p["dependencies"]]
    reqs += [Requirement(r) for extra in p["optional-dependencies"].values() for r in extra
             if not r.startswith("spdecode")]
    pinned = constraints()
    for r in reqs:
        assert not any(s.operator == "==" for s in r.specifier), f"{r} is pinned exactly in pyproject.toml"
        name = r.name.lower().replace("_", "-")
        assert name in pinned, f"{r.name} has no exact version in constraints.txt"
        assert r.specifier.contains(pinned[name], prereleases=True), f"constraints.txt's {name} is outside {r}"
    torch = next(r for r in reqs if r.name == "torch")
    assert any(s.operator == "<" for s in torch.specifier)  # capped at the first untested release


def test_server_plotting_and_data_cleaning_are_extras():
    p = project()
    core = {Requirement(r).name.lower() for r in p["dependencies"]}
    extras = p["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        names = {Requirement(r).name.lower().replace("-", "_") for r in extras[extra]}
        assert set(modules) <= names and not core & set(modules), extra


def test_a_missing_extra_names_its_install_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    with pytest.raises(SpdError, match=r"spdecode serve needs fastapi: pip install 'spdecode\[serve\]'"):
        require_extra("serve", "spdecode serve")
    require_extra("plot", "bench --plot")  # installed here: no error
