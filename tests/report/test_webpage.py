"""The leaderboard's web page in a real browser: headless Chromium loads it, sorts its tables, and its
numbers are the results rows'."""

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tokenbench.measure.stats import decimals_for
from tokenbench.report.leaderboard import load_rows, write_leaderboard

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)

# Injected first in <head>: record every error the page raises.
CAPTURE = """<script>window.pageErrors = [];
window.addEventListener('error', e => window.pageErrors.push(String(e.message)));</script>"""

# Injected after the page's own script: click headers like a user, then report what the tables hold.
PROBE = """<script>window.addEventListener('load', () => {
  const values = (table, column) => Array.from(table.tBodies[0].rows, r => parseFloat(r.cells[column].dataset.value));
  const report = {errors: window.pageErrors, tables: []};
  document.querySelectorAll('table.board').forEach(table => {
    const head = Array.from(table.tHead.rows[0].cells, c => c.textContent);
    const sorted = {};
    for (const name of ['top-1 %', 'GMACs']) {
      const header = table.tHead.rows[0].cells[head.indexOf(name)];
      header.click();
      sorted[name] = {first: values(table, head.indexOf(name)), sort: header.getAttribute('aria-sort')};
      header.click();
      sorted[name].second = values(table, head.indexOf(name));
    }
    report.tables.push({heading: table.closest('section').querySelector('h2').textContent, head, sorted,
      rows: Array.from(table.tBodies[0].rows, r => Array.from(r.cells, c => [c.textContent, c.dataset.value || null]))});
  });
  report.titles = Array.from(document.querySelectorAll('svg g[id^="tb-point-"] > title'), t => t.textContent);
  const out = document.createElement('pre');
  out.id = 'test-report';
  out.textContent = JSON.stringify(report);
  document.body.appendChild(out);
});</script>"""


def browse(page: Path, tmp_path: Path) -> tuple[dict, str]:
    """Load `page` (with the probe injected) in headless Chromium: its report and the browser's console log."""
    text = page.read_text(encoding="utf-8")
    probed = tmp_path / "probed.html"
    probed.write_text(text.replace("<head>", "<head>" + CAPTURE, 1).replace("</body>", PROBE + "</body>", 1),
                      encoding="utf-8")
    run = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                          "--virtual-time-budget=10000", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                          probed.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="test-report">(.*?)</pre>', run.stdout, re.S)
    assert found, f"the page never finished loading:\n{run.stderr[-3000:]}"
    return json.loads(html.unescape(found.group(1))), run.stderr


def test_leaderboard_page_loads_sorts_and_shows_the_rows(tmp_path):
    if CHROMIUM is None:
        message = "headless Chromium is not installed (Debian: apt-get install chromium)"
        if os.environ.get("TOKENBENCH_REQUIRE_BROWSER"):  # set by .ci/run, where the test must run
            pytest.fail(message)
        pytest.skip(message)
    results = REPO / "results" / "cifar10-v1"  # the board with matched-budget tables too
    write_leaderboard(results, tmp_path)
    page = tmp_path / "index.html"
    text = page.read_text(encoding="utf-8")
    assert not re.search(r'(src|href)="(https?:)?//|url\((https?:)?//|@import', text), "the page must work offline"

    report, console = browse(page, tmp_path)
    assert report["errors"] == []
    assert not [line for line in console.splitlines() if ":CONSOLE" in line], console

    rows = load_rows(results)
    sweep = rows[rows["budget"].isna()]
    assert [t["heading"] for t in report["tables"]] == ["cifar10 · vit_cifar10", "cifar10 · vit_cifar10 · matched "
                                                        "budget 0.5 × dense", "cifar10 · vit_cifar10 · matched budget 0.7 × dense"]
    for table in report["tables"]:
        for name, seen in table["sorted"].items():
            assert seen["sort"] == "ascending" and seen["first"] == sorted(seen["first"]), name
            assert seen["second"] == sorted(seen["first"], reverse=True), name

    table = report["tables"][0]
    column = {name: i for i, name in enumerate(table["head"])}
    decimals = decimals_for(int(sweep["n_images"].max()))
    assert len(table["rows"]) == len(sweep)
    for cells in table["rows"]:
        method, knobs = cells[column["method"]][0], cells[column["knobs"]][0]
        row = sweep[(sweep["method"] == method) & (sweep["knob_text"] == knobs)].iloc[-1]
        top1_text, top1_value = cells[column["top-1 %"]]
        assert top1_text == f"{100 * row['top1']:.{decimals}f}" and float(top1_value) == 100 * row["top1"]
        assert float(cells[column["GMACs"]][1]) == row["gmacs"]
        assert float(cells[column["img/s"]][1]) == row["throughput"]

    # Every point of both sweep plots has a hover title naming the method, its knobs and its top-1.
    assert len(report["titles"]) == 2 * len(sweep)
    for _, row in sweep.iterrows():
        assert any(t.startswith(f"{row['method']} {row['knob_text']}\n") and f"top-1 {100 * row['top1']:.{decimals}f} %"
                   in t for t in report["titles"]), (row["method"], row["knob_text"])
