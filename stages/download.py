"""DVC stage `download`: the base checkpoint (HuggingFace layout) into models/hf; params: download."""

import sys

from glm3.pipeline.run import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("download"))
