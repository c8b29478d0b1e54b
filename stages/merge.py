"""DVC stage `merge`: the run's per-rank checkpoints -> one model in models/merged; params: merge, parallel."""

import sys

from glm3.pipeline.run import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("merge"))
