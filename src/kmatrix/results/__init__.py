"""The results contract (results.json) and the pure code that fills and reads it.

``schema`` owns the shape, the KMX1 probe-record parser and atomic writes; ``oomlog`` and
``oom`` turn consoles and probe records into OOM entries; ``repeats`` aggregates repeated
scenarios; ``cache`` is the result cache; ``view`` holds read-only accessors. Written by
cells/ and run/, read by report/ and gate/.
"""
