import sys

from .stage import main

sys.exit(main())
