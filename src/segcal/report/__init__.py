"""Bench outputs: Markdown tables (:mod:`.tables`) and the self-contained HTML report (:mod:`.html`)."""
