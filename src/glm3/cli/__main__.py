"""`python -m glm3.cli`: the same as the `glm3` command."""

import sys

from glm3.cli import main

sys.exit(main())
