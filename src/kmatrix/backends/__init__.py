"""How a guest runs: a QEMU process or a Docker container, never outliving kmatrix.

``qemu`` builds and runs QEMU command lines, ``docker`` talks to the engine, and
``lifeline`` wraps each child in ``guard`` (QEMU) or pairs it with ``reaper`` (containers),
two stdlib-only scripts run by file path. The bottom of the flow: used by cells/, run/ and
guest/ (the probe image); imports nothing of kmatrix outside backends/ but errors.
"""
