"""Debian archives: where they are, how they are read and verified, which suites a kernel means.

``sources`` finds the mirrors (the host's apt sources, matrix.yaml, the environment),
``deb822`` parses Packages/Release/.sources, ``archive`` is the verified client (InRelease
signature -> Packages SHA256 -> .deb SHA256) and ``suites`` resolves a kernel entry across
suites as apt would. Used by run/ (every kernel is resolved before any boot) and guest/.
"""
