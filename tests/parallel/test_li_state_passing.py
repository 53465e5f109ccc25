"""LI context parallelism by state passing (``sh2_jax/parallel/li_state_passing.py``) equals the
unsharded kernel: the check runs in its own process (``li_state_passing_check.py``), since the
forced host device count is fixed at JAX start-up."""

import os
import subprocess
import sys

CP_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "li_state_passing_check.py")


def test_context_parallel_state_passing_8_devices():
  """State passing over 8 CPU devices (zig-zag layout) equals the unsharded kernel, forward and
  gradients (in a subprocess: the device count is fixed at JAX start-up)."""
  proc = subprocess.run([sys.executable, CP_SCRIPT],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
