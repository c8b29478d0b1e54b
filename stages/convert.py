"""DVC stage `convert`: models/hf -> MindSpore shards in models/ms; params: convert."""

import sys

from glm3.pipeline.run import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("convert"))
