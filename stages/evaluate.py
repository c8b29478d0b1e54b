"""DVC stage `evaluate`: C-Eval accuracy of the exported model (metrics/ceval.json); params: evaluate."""

import sys

from glm3.pipeline.run import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("evaluate"))
