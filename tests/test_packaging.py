"""The wheel: what it holds, what it requires, and that it works installed outside the source tree.

The wheel is built from a copy of the package sources (``pyproject.toml``, ``README.md``,
``learned_opt/``) with the build tools already installed (no network), installed into a fresh
venv without its dependencies, and run from a directory outside the source tree; the fresh venv
reaches the already-installed torch and the other dependencies through a ``.pth`` file naming this
environment's site-packages (whose own ``.pth`` files, such as the editable install of this
checkout, are not processed there).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

import learned_opt

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "learned_opt"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    shutil.copy2(ROOT / "pyproject.toml", src)
    shutil.copy2(ROOT / "README.md", src)
    shutil.copytree(
        PACKAGE, src / "learned_opt", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["--quiet", str(src), "-w", str(out)],
        check=True,
        cwd=src,
        timeout=600,
    )
    (found,) = out.glob("learned_opt-*.whl")
    return found


def test_wheel_holds_every_module_the_weights_and_the_kernel_sources(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        p.relative_to(ROOT).as_posix()
        for pattern in ("**/*.py", "pretrained/*.pt", "pretrained/*.json", "kernels/*.cpp")
        for p in PACKAGE.glob(pattern)
        if "__pycache__" not in p.parts
    }
    assert {"learned_opt/pretrained/general.pt", "learned_opt/pretrained/general.json"} <= expected
    assert any(n.startswith("learned_opt/kernels/") and n.endswith(".cpp") for n in expected)
    assert expected - names == set()
    # Nothing but the package and its metadata: no tests, benchmarks or experiments.
    tops = {n.split("/")[0] for n in names}
    assert tops - {"learned_opt"} == {next(t for t in tops if t.endswith(".dist-info"))}


def test_wheel_requires_a_torch_range_not_a_pin(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [
            line.split(":", 1)[1].strip()
            for line in zf.read(meta).decode().splitlines()
            if line.startswith("Requires-Dist:")
        ]
    (torch_req,) = [r for r in requires if r.split(";")[0].replace(" ", "").startswith("torch")]
    assert "==" not in torch_req and ">=" in torch_req, torch_req
    # The torch of this environment satisfies it.
    assert Requirement(torch_req).specifier.contains(torch.__version__.split("+")[0])


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed; returns the venv's directory."""
    venv = tmp_path_factory.mktemp("env") / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300
    )
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout.strip()
    )
    # This environment's packages (torch, numpy, ...) after the fresh venv's own.
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps"]
        + ["--no-index", "--quiet", str(wheel)],
        check=True,
        timeout=600,
    )
    return venv


_USE = """
import json, sys
from pathlib import Path
import torch
import learned_opt
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
opt = learned_opt.LSTMOptimizer(model.parameters())
before = [p.detach().clone() for p in model.parameters()]
x, y = torch.randn(16, 4), torch.randn(16, 1)
for _ in range(3):
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
kernels = Path(learned_opt.kernels.__file__).parent
print(json.dumps({
    "file": learned_opt.__file__,
    "weights": {n: str(learned_opt.pretrained.path(n)) for n in learned_opt.pretrained.available()},
    "moved": all(not torch.equal(a, b) for a, b in zip(model.parameters(), before)),
    "cpp": sorted(p.name for p in kernels.glob("*.cpp")),
    "kernels": learned_opt.kernels.available(),
    "sys_path": sys.path,
}))
"""


def _use(venv: Path, cwd: Path, **env: str) -> dict:
    """Train a small model with the installed package's default weights, from ``cwd``."""
    run = subprocess.run(
        [str(venv / "bin" / "python"), "-c", _USE],
        check=True,
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **env},
        timeout=600,
    )
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).is_relative_to(venv), got["file"]
    assert str(ROOT) not in got["sys_path"]
    assert got["moved"]
    return got


def test_installed_wheel_loads_the_shipped_weights_outside_the_source_tree(
    installed: Path, tmp_path: Path
) -> None:
    # Without compiling the fused kernels (a minute or two; the slow test below compiles them).
    got = _use(installed, tmp_path, LEARNED_OPT_NO_EXT="1")
    shipped_names = {
        "general", "general-v2", "general-v3", "general-v4", "general-v4-wide", "general-v5",
        "general-v6", "general-v7",
        "general-wide", "paper-mnist", "quadratic",
    }  # fmt: skip
    assert shipped_names <= set(got["weights"])
    assert all(Path(p).is_relative_to(installed) for p in got["weights"].values())
    shipped = sorted(p.name for p in (PACKAGE / "kernels").glob("*.cpp"))
    assert got["cpp"] == shipped and shipped
    # The console script is installed and runs.
    cli = subprocess.run(
        [str(installed / "bin" / "learned-opt"), "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert cli.returncode == 0 and "usage" in cli.stdout.lower()


@pytest.mark.slow
def test_installed_wheel_compiles_its_fused_kernels(installed: Path, tmp_path: Path) -> None:
    """The shipped C++ sources compile and load (in a build cache of its own, so that the
    checkout's cached build is left alone), wherever this checkout's kernels do."""
    got = _use(installed, tmp_path, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    assert got["kernels"] == learned_opt.kernels.available()
