"""What is rendered from results: report.md, its charts, the Findings, and diffs.

``markdown`` writes report.md, ``oom`` its OOM section, ``findings`` / ``findings_memfd``
the Findings table and ``findings_chart`` / ``charts`` the SVGs; ``diff`` compares two
results files; ``dirs`` manages reports/NAME/ (the run lock, results kept from earlier
runs). Reads results/ only (and the name pattern of config); called by run/ and tasks.
"""
