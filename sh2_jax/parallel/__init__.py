"""Context parallelism: the sequence split over the ``context`` mesh axis (zig-zag), with the
collectives each operator needs — halos for the FIR filters, all-to-all or a distributed FFT for
LI, K/V all-gather or a ring for attention — and a forward pass of the whole model on that mesh.
"""
