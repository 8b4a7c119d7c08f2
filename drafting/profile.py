"""`python -m drafting.profile`: the calibration CLI (`drafting.calibrate.cli`)."""
import sys

from drafting.calibrate.cli import main

if __name__ == "__main__":
    sys.exit(main())
