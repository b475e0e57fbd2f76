#!/usr/bin/env python
"""One-off benchmark runs (make-dataset, inference, eval, run, list); any python 3.9+ can start it."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluator.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
