#!/usr/bin/env python
"""Quantize an ONNX export to int8 for OpenVINO (NNCF), written only if its accuracy holds.

The command line of :mod:`dino_d2.cli.quantize`; ``--help`` lists the options.
"""

import sys

from dino_d2.cli.quantize import main

if __name__ == "__main__":
    sys.exit(main())
