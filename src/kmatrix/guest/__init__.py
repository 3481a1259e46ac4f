"""What a cell boots or runs: the guest userland, its initrd, the kernel and its modules.

``userland`` builds the Debian userland and the per-cell archive, ``cpio`` writes the newc
format the kernel unpacks, ``kmods`` picks the kernel's own modules in load order,
``kernels`` turns a matrix kernel entry into bootable files, and ``probe_image`` builds the
probe container image from the same userland. Built from debian/ packages; used by cells/
and run/.
"""
