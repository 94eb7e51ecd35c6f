"""Render report.html in headless Chromium and check that every figure loads."""

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from evaluation.harness import evaluate
from tests.evaluation.synth import make_tables

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]

# Appended to a copy of the report: writes a marker with the count of images that decoded.
CHECK_JS = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.from(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var m = document.createElement('pre'); m.id = 'qsmrim-marker';
  m.textContent = 'QSMRIM-IMAGES ' + ok + '/' + imgs.length;
  document.body.appendChild(m);
});
</script>
"""


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    part, les, pred = make_tables(np.random.default_rng(7))
    evaluate(part, les, [pred], n_boot=100, out_dir=out)
    return out


def test_html_is_self_contained(report_dir):
    html = (report_dir / "report.html").read_text()
    srcs = re.findall(r'src="([^"]+)"', html)
    assert len(srcs) == 5 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in html and "https://" not in html   # nothing fetched online
    assert "Per-patient diagnosis" in html and "DeLong" in html


@pytest.mark.skipif(not CHROMIUM.exists(),
                    reason="headless Chromium not installed: apt-get install -y chromium")
def test_every_figure_loads_in_headless_chromium(report_dir, tmp_path):
    page = tmp_path / "check.html"
    page.write_text((report_dir / "report.html").read_text().replace("</body>",
                                                                      CHECK_JS + "</body>"))
    profile = tmp_path / "profile"
    profile.mkdir()
    cmd = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000",
           "--dump-dom", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    m = re.search(r"QSMRIM-IMAGES (\d+)/(\d+)", proc.stdout)
    assert m, f"no marker in the DOM; chromium stderr: {proc.stderr[-2000:]}"
    assert m.group(1) == m.group(2) == "5"
    shot = tmp_path / "shot.png"
    subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "--hide-scrollbars",
                    "--window-size=1100,1400", f"--screenshot={shot}",
                    (report_dir / "report.html").as_uri()], capture_output=True, timeout=120)
    assert shot.stat().st_size > 20_000   # a rendered page, not a blank one
    shutil.rmtree(profile, ignore_errors=True)
