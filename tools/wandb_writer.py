#!/usr/bin/env python
"""Write existing evaluation results to W&B and build leaderboards. Run with .venvs/daemon/bin/python; see --help."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recorder.writer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
