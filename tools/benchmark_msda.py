#!/usr/bin/env python
"""Benchmark the multi-scale deformable attention backends at DINO's encoder shape.

The command line of :mod:`dino_d2.cli.benchmark_msda`; ``--help`` lists the options.
"""

import sys

from dino_d2.cli.benchmark_msda import main

if __name__ == "__main__":
    sys.exit(main())
