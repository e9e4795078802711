"""The built wheel carries the shipped `-c` configs: installed without the repository, `-c` finds them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_an_installed_wheel_loads_a_shipped_config(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("mttl-*.whl"))
    shipped = sorted(p.relative_to(REPO / "mttl").as_posix() for p in (REPO / "mttl" / "configs").rglob("*.json"))
    with zipfile.ZipFile(wheel) as archive:
        in_wheel = sorted(n[len("mttl/"):] for n in archive.namelist() if n.startswith("mttl/configs/"))
    assert shipped and in_wheel == shipped

    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                                str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    # From a folder outside the repository, with the installed copy first on the path: the
    # editable install's finder comes after the path entries, so this imports the wheel's mttl.
    probe = ("import mttl.config as c; from pathlib import Path; "
             "cfg = c.load_config('t0/pretrain.json+t0/mhr.json', ['total_steps=7']); "
             "print(cfg.model, cfg.total_steps, cfg.n_splits); "
             "print(Path(c.__file__).resolve().parent); print(c.find_config_file('t0/pretrain.json'))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    *values, package_dir, found = run.stdout.split()
    mhr = json.loads((REPO / "mttl" / "configs" / "t0" / "mhr.json").read_text())
    assert values == ["google/t5-xl-lm-adapt", "7", str(mhr["n_splits"])]
    assert Path(package_dir) == (site / "mttl").resolve()
    assert Path(found).resolve() == (site / "mttl" / "configs" / "t0" / "pretrain.json").resolve()
