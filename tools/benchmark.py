#!/usr/bin/env python
"""Inference latency, or training-step time, and memory of a dino_d2 config.

The command line of :mod:`dino_d2.cli.benchmark`; ``--help`` lists the options.
"""

import sys

from dino_d2.cli.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
