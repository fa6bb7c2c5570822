#!/usr/bin/env python
"""Export a dino_d2 config to ONNX, torch.export (.pt2) or AOTInductor, and prove the export.

The command line of :mod:`dino_d2.cli.export_model`; ``--help`` lists the options.
"""

import sys

from dino_d2.cli.export_model import main

if __name__ == "__main__":
    sys.exit(main())
