"""``python -m pyfused.train``: the training CLI (:mod:`pyfused.cli.train`) as a module entry point."""
import sys

from pyfused.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
