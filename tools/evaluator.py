#!/usr/bin/env python
"""Checkpoint-watching evaluation daemon. Run with .venvs/daemon/bin/python; see --help."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluator.daemon.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
