"""``python -m bench``: see :mod:`bench.run`.

``OMP_WAIT_POLICY`` defaults to ``ACTIVE`` here, before torch loads its OpenMP runtime (it reads the variable
once, at load): with the variable unset, libgomp's default wait on some small VMs stalls every parallel op for
milliseconds once numpy is loaded (matplotlib, triton and torch.compile load it), which would bury the
difference between implementations under an artefact. Set it yourself to measure another policy; the stamp
of every row records it.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")

from bench.run import main  # noqa: E402  (after the OpenMP setting, which must precede importing torch)

if __name__ == "__main__":
    raise SystemExit(main())
