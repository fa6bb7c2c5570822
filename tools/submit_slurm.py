#!/usr/bin/env python
"""Submit a training run of tools/lazyconfig_train_net.py as a SLURM job (submitit), which
requeues itself on pre-emption or timeout and resumes from its last checkpoint.

The command line of :mod:`dino_d2.cli.submit_slurm`; ``--help`` lists the options.
"""

import sys

from dino_d2.cli.submit_slurm import main

if __name__ == "__main__":
    sys.exit(main())
