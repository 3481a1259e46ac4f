"""Release gates: expectations declared in matrix.yaml, checked against results.

``expectations`` parses and evaluates the one-line grammar (config validates matrix.yaml
with it); ``check`` is `invoke check` and the end of `invoke matrix`, with JUnit output.
Used by run/ and tasks; reads results/.
"""
