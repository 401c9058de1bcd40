"""`python -m dfield ...` is the `dfield` command; so is `torchrun --nproc-per-node N -m dfield train ...`, which
starts N processes of one data-parallel job."""

import sys

from dfield.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
