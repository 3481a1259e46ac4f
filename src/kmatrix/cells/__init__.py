"""One cell of the matrix: boot a guest (or start a container) and turn it into a result.

``qemu`` runs a QEMU cell's accounting boot, ``oom_boots`` its OOM boots (restored from the
boot ``oom_saved`` saves; ``oom_guest`` says what an OOM guest is made of), ``docker`` a
docker cell, and ``console`` reads a serial console log. Called by run/ for each cell; they
run guests through backends/ and build results.json cells with results/.
"""
