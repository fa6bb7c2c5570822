#!/usr/bin/env python
"""Write a synthetic COCO json shaped like Objects365 (streaming; the images need not exist).

The command line of :mod:`dino_d2.cli.make_synthetic_coco`; ``--help`` lists the options.
"""

import sys

from dino_d2.cli.make_synthetic_coco import main

if __name__ == "__main__":
    sys.exit(main())
