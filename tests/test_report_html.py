"""`medcl evaluate --report`: a self-contained page that a real browser renders with its table and images."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from medcl_cli.evaluate import metrics
from medcl_cli.core.files import write_text_atomic
from medcl_cli.evaluate.report_html import case_panel, middle_slices, render_report


def _fake_eval(n_cases: int = 3):
    rng = np.random.default_rng(0)
    rows, panels = [], {}
    for i in range(n_cases):
        ref = np.zeros((6, 32, 32), np.int64)
        ref[1:5, 8:20, 8:20] = 1
        ref[2:4, 12:16, 12:16] = 2
        pred = np.roll(ref, i * 3, axis=2)  # case 0 perfect, later cases shifted: worse
        img = rng.normal(size=ref.shape).astype(np.float32) + ref
        cid = f"case_{i:04d}"
        rows += metrics.case_metrics(cid, pred, ref, (2.0, 1.0, 1.0), {0: "background", 1: "outer", 2: "inner"})
        panels[cid] = case_panel(img, ref, pred, (2.0, 1.0, 1.0), 3)
    per_case = metrics.per_case_frame(rows)
    return per_case, metrics.summarize(per_case), panels


def test_middle_slices_follow_the_structure():
    ref = np.zeros((20, 4, 4), np.int64)
    ref[10:15] = 1
    s = middle_slices(ref, ref)
    assert len(s) == 3 and all(10 <= z <= 14 for z in s)
    assert middle_slices(np.zeros((5, 2, 2)), np.zeros((5, 2, 2))) == [1, 2, 3]


def test_page_is_self_contained_and_orders_worst_first(tmp_path):
    per_case, summary, panels = _fake_eval()
    page = render_report(per_case, summary, {"method": "supervised", "split": "val", "run_id": "r1"}, panels)
    assert "<table id=\"summary\">" in page
    assert page.count("data:image/png;base64,") == 2 + len(panels)  # 2 distribution plots + one per case
    assert not re.search(r'src="(?!data:)', page), "every image must be embedded"
    assert "<script" not in page and "http://" not in page and "https://" not in page
    order = re.findall(r"<h3>(case_\d+)", page)
    means = per_case.groupby("case_id")["dice"].mean()
    assert order == list(means.sort_values().index), "cases must be listed worst first"
    assert order[-1] == "case_0000"
    out = tmp_path / "report.html"
    write_text_atomic(page, out)
    assert out.read_text(encoding="utf-8") == page


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_a_headless_browser(tmp_path):
    browser = _chromium()
    if browser is None:
        msg = "chromium not installed (apt-get install chromium); .ci/run installs it"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    per_case, summary, panels = _fake_eval()
    page = tmp_path / "report.html"
    write_text_atomic(render_report(per_case, summary, {"method": "gcl", "split": "val"}, panels), page)
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
        "--hide-scrollbars", "--window-size=1000,1400",
    ]
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<tr>") == 1 + summary["label"].nunique(), "summary table rows rendered"
    assert dom.stdout.count("<img") == 2 + len(panels)
    shot = tmp_path / "shot.png"
    res = subprocess.run([browser, *flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    import matplotlib.image as mpimg

    px = mpimg.imread(str(shot))[..., :3]
    assert px.std() > 0.05, "screenshot is blank"
    # the embedded plots are drawn: pixels of the class colours appear on screen
    blue = np.array([0x1F, 0x77, 0xB4]) / 255.0
    assert (np.abs(px - blue).max(-1) < 0.08).sum() > 20, "no plot colour on screen: images did not render"
    assert pd.notna(px).all()
