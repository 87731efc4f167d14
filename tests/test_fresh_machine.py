"""The README's first command on a machine with no ComfyUI anywhere but the source archive.

Runs `bash scripts/quickstart.sh` with an empty HOME (so an empty cache folder, no ~/ComfyUI, no
COMFYUI_PATH or COMFYUI_PYTHON): it must provision the host from the archive, make its own venv,
link the pack, run the example workflow headless on the trained testbed checkpoint and write
pictures that mean something: the reconstruction close to the input, the edit blue where the
input is red. Minutes: it installs a venv.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import provision

ROOT = Path(__file__).resolve().parents[1]
ARCHIVES = [a for a in provision.archive_candidates() if a.is_file()]


@pytest.mark.skipif(not ARCHIVES, reason="no ComfyUI source archive (../shared/hosts) to provision from")
def test_quickstart_on_a_clean_home_provisions_and_writes_the_images(tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    import testbed

    home = tmp_path / "home"
    home.mkdir()
    out = tmp_path / "out"
    keep = {k: v for k, v in os.environ.items()
            if k.startswith(("PIP_", "LC_")) or k in ("PATH", "LANG", "SSL_CERT_FILE", "TMPDIR")}
    env = {**keep, "HOME": str(home), "OUT": str(out), "COMFYUI_INVERSE_ARCHIVE": str(ARCHIVES[0]),
           "PYTHON": getattr(sys, "_base_executable", sys.executable),
           # the package downloads may come from the real user's pip cache: only ComfyUI must be absent
           "PIP_CACHE_DIR": os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "quickstart.sh")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=1500)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    host = home / ".cache" / "comfyui-inverse" / "hosts" / f"ComfyUI-{provision.PINNED_VERSION}"
    assert f"ComfyUI {provision.PINNED_VERSION} at {host} (from archive)" in log, log[-3000:]
    assert str(home / ".cache" / "comfyui-inverse" / "venv-py") in log  # its own isolated Python
    assert (host / "custom_nodes" / "ComfyUI-Inverse").resolve() == ROOT
    assert "bash scripts/ui.sh" in log
    pngs = {p.name.split("_0")[0]: p for p in out.rglob("*.png")}
    assert sorted(pngs) == ["edit", "input", "reconstruction", "vae_roundtrip"], pngs
    img = {k: torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
           for k, p in pngs.items()}
    assert all(v.shape == (1, 3, 48, 48) for v in img.values())

    def psnr(a, b):
        return float(10 * torch.log10(1 / (a - b).pow(2).mean()))

    assert psnr(img["reconstruction"], img["input"]) > 20, psnr(img["reconstruction"], img["input"])
    red, blue = testbed.COLOUR_NAMES.index("red"), testbed.COLOUR_NAMES.index("blue")
    assert int(testbed.measured_colour(img["input"])) == red
    assert int(testbed.measured_colour(img["edit"])) == blue
