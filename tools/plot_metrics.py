#!/usr/bin/env python
"""Plot the loss and AP curves of a training run from Detectron2's ``metrics.json``.

The command line of :mod:`dino_d2.cli.plot_metrics`; ``--help`` lists the options.
"""

import sys

from dino_d2.cli.plot_metrics import main

if __name__ == "__main__":
    sys.exit(main())
