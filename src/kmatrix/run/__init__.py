"""The commands that drive a run, from `invoke` (tasks) down to the cells.

``matrix`` is `invoke matrix`; ``ci`` the CI fan-out (`ci-matrix`, `cell`) and ``merge``
its merge; ``in_docker``, ``matrix_in_docker`` and ``runner_image`` are `--runtime docker`;
``bench`` is `invoke bench`; ``progress`` and ``interrupt`` serve them all. Called by
tasks; calls debian/, guest/, cells/, report/ and gate/.
"""
