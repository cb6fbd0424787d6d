"""The page every segcal HTML report shares: one stylesheet, a self-contained document (no script,
no external resource). Light (no torch, no matplotlib), so ``segcal eval --html`` imports nothing
of the benchmark."""

from __future__ import annotations

import html

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1320px;
color:#222;padding:0 16px;line-height:1.4}
h1{font-size:1.6em;border-bottom:2px solid #4c72b0;padding-bottom:4px}
h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
.tw{overflow-x:auto;margin:8px 0}
table{border-collapse:collapse;font-size:12.5px;white-space:nowrap}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f2f4f8}
td:first-child,th:first-child{text-align:left;font-weight:600}
tr:nth-child(even) td{background:#fafafa}
td.sig{color:#8b1a1a}\nsmall{color:#666;font-size:10.5px}\ntd.sig small{color:#8b1a1a}
code{background:#f4f4f4;padding:0 3px;border-radius:3px;font-size:.92em}
img{max-width:100%;height:auto;border:1px solid #eee}
ul{font-size:13.5px}
"""


def html_document(body: list[str], title: str, extra_css: str = "") -> str:
    """A self-contained HTML page (the report style, no script, no external resource) of ``body``."""
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}{extra_css}</style></head><body>" + "\n".join(body) + "</body></html>\n")


__all__ = ["CSS", "html_document"]
