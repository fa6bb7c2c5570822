#!/usr/bin/env python
"""Time and memory of the COCO-format data path: the memory-mapped cache against the json read
whole.

The command line of :mod:`dino_d2.cli.benchmark_dataset`; ``--help`` lists the options.
"""

import sys

from dino_d2.cli.benchmark_dataset import main

if __name__ == "__main__":
    sys.exit(main())
