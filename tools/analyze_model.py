#!/usr/bin/env python
"""Parameters and FLOPs of a dino_d2 config, counted with fvcore.

The command line of :mod:`dino_d2.cli.analyze_model`; ``--help`` lists the options.
"""

import sys

from dino_d2.cli.analyze_model import main

if __name__ == "__main__":
    sys.exit(main())
