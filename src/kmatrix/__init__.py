"""kmatrix: how memfd and O_TMPFILE pages are accounted, and whom the OOM killer kills."""

__version__ = "0.1.0"
