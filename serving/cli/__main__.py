"""`python -m serving.cli`: the `conveyor` command line without its console script."""

import sys

from serving.cli.main import main

sys.exit(main())
