#!/usr/bin/env python
"""Run a dino_d2 LazyConfig on images: one visualised PNG per image and a JSON of detections.

The command line of :mod:`dino_d2.cli.demo`; ``--help`` lists the options.
"""

import sys

from dino_d2.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
