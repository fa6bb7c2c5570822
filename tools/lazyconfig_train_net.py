#!/usr/bin/env python
"""Train or evaluate a dino_d2 LazyConfig with Detectron2's standard training loop.

The command line of :mod:`dino_d2.cli.train_net`; ``--help`` lists the options.
"""

import sys

from dino_d2.cli.train_net import invoke_main

if __name__ == "__main__":
    sys.exit(invoke_main())
