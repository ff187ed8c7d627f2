"""The leaderboard as one self-contained web page: sortable tables, plots with hover, provenance.

Everything is inline (styles, the few lines of script, the plots as SVG), so the file opens offline and can
be mailed or attached to a paper's artifacts. The plots are the same matplotlib figures as the PNGs of the
markdown board; each point carries an SVG `<title>`, which browsers show on hover. Numeric cells carry
their unrounded value in `data-value`, which is what sorting uses.
"""

from __future__ import annotations

import html
import json
import math
import numbers
import re
from pathlib import Path

from tokenbench.report.board import Board, Section

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
code { background: #f3f3f3; padding: 0 .25em; border-radius: 3px; }
table.board { border-collapse: collapse; margin: .8em 0; font-size: 13px; }
table.board th, table.board td { border: 1px solid #ddd; padding: .25em .55em; text-align: right; white-space: nowrap; }
table.board td:nth-child(-n+2), table.board th:nth-child(-n+2) { text-align: left; }
table.board th { background: #f6f6f6; cursor: pointer; user-select: none; }
table.board th[aria-sort=ascending]::after { content: " ▲"; }
table.board th[aria-sort=descending]::after { content: " ▼"; }
table.board tr:hover td { background: #fffbe6; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
.plots svg { width: 580px; height: auto; }
.settings { color: #555; }
.table-wrap { overflow-x: auto; }
details pre { background: #f6f6f6; padding: .6em; overflow-x: auto; }
"""

# Click a header to sort by it (numbers by their unrounded data-value, numbers before text, blanks last);
# click again to reverse.
SCRIPT = """
function sortKey(cell) {
  const raw = cell.dataset.value !== undefined ? cell.dataset.value : cell.textContent.replace(/\\u2212/g, '-').trim();
  const number = parseFloat(raw);
  return raw === '' ? [2, ''] : isNaN(number) ? [1, raw] : [0, number];
}
function sortTable(header) {
  const table = header.closest('table');
  const column = Array.prototype.indexOf.call(header.parentNode.children, header);
  const ascending = header.getAttribute('aria-sort') !== 'ascending';
  table.querySelectorAll('th').forEach(th => th.removeAttribute('aria-sort'));
  header.setAttribute('aria-sort', ascending ? 'ascending' : 'descending');
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const [ka, va] = sortKey(a.cells[column]), [kb, vb] = sortKey(b.cells[column]);
    if (ka !== kb) return ka - kb;
    const order = va < vb ? -1 : va > vb ? 1 : 0;
    return ascending ? order : -order;
  });
  rows.forEach(row => body.appendChild(row));
}
document.querySelectorAll('table.board th').forEach(th => th.addEventListener('click', () => sortTable(th)));
"""


def inline_markdown(text: str) -> str:
    """The markdown the boards use in prose (`code`, **bold**) as HTML, everything else escaped."""
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def cell(value, sort_value=None) -> str:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        text = "" if math.isnan(value) else f"{value:.4g}"
        sort_value = value if sort_value is None else sort_value
    else:
        text = "" if value is None else str(value)
    attribute = ""
    if isinstance(sort_value, numbers.Real) and not (isinstance(sort_value, float) and math.isnan(sort_value)):
        attribute = f' data-value="{float(sort_value)!r}"'
    return f"<td{attribute}>{html.escape(text)}</td>"


def table_html(section: Section) -> str:
    columns = list(section.table.columns)
    head = "".join(f'<th scope="col">{html.escape(str(c))}</th>' for c in columns)
    body = []
    for index, row in section.table.iterrows():
        cells = [cell(row[c], section.values[c].loc[index] if c in section.values else None) for c in columns]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="board"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def inline_svg(document: str) -> str:
    """An SVG file's text without its XML prologue, ready to sit inside HTML."""
    return document[document.index("<svg"):]


def render_page(board: Board) -> str:
    title = board.title
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p>{inline_markdown(board.intro)}</p>",
             f"<p>Regenerate this page with <code>{html.escape(board.command)}</code>. Click a column header to sort; "
             "hover over a point for its numbers.</p>"]
    for s in board.sections:
        parts += ["<section>", f"<h2>{html.escape(s.heading)}</h2>",
                  f'<p class="settings">{inline_markdown(s.settings)}</p>', f'<div class="table-wrap">{table_html(s)}</div>']
        if s.plots:
            parts.append('<div class="plots">' + "".join(inline_svg(svg) for _, svg in s.plots) + "</div>")
        if s.provenance:
            parts.append("<details><summary>provenance of the dense row</summary><pre>"
                         + html.escape(json.dumps(s.provenance, indent=1, sort_keys=True, default=str))
                         + "</pre></details>")
        parts.append("</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts)
            + f"\n<script>{SCRIPT}</script>\n</body></html>\n")


def write_webpage(board: Board, out_dir: Path) -> Path:
    """The board as `index.html`, one self-contained file."""
    path = out_dir / "index.html"
    path.write_text(render_page(board), encoding="utf-8")
    return path
