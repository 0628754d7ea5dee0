"""The layout files shipped inside the package: identical to ../shared/reference, and enough for
``prune_ckpt.py --report`` in an installed copy of ``ldm`` far from the source tree."""
from __future__ import annotations

import shutil
import subprocess
import sys

from conftest import REPO, SHARED


def test_shipped_layouts_equal_the_shared_reference():
    shipped = sorted((REPO / "ldm" / "reference").glob("*.tsv"))
    assert [p.name for p in shipped] == sorted(p.name for p in (SHARED / "reference").glob("*.tsv"))
    for path in shipped:
        assert path.read_bytes() == (SHARED / "reference" / path.name).read_bytes(), path.name


def test_size_report_from_an_installed_package(tmp_path):
    """Only the ``ldm`` package, copied elsewhere (as pip installs it): no source tree, no ../shared."""
    site = tmp_path / "site-packages"
    shutil.copytree(REPO / "ldm", site / "ldm", ignore=shutil.ignore_patterns("__pycache__"))
    code = "from ldm.export.prune import full_size_report, format_size_report; print(format_size_report(full_size_report()))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The full-EMA v1 file: 1,066,235,307 fp32 parameters + 859,520,964 EMA copies + 12 x 1000 buffers + the EMA
    # counters and position_ids (reference README), i.e. 7.70 GB.
    assert "7.703 GB" in proc.stdout.splitlines()[0], proc.stdout
