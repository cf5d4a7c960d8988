"""Training entry point: ``accelerate launch launch/train.py --config configs/X.yaml key=value ...``.

The same as ``segdist train``; kept as a file so ``accelerate launch`` and SLURM scripts can
point at it.
"""

import sys

from segdist.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
