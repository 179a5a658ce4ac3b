"""``python -m bench.gpu_check``: see :mod:`bench.gpu_check`."""
from bench.gpu_check import main

raise SystemExit(main())
