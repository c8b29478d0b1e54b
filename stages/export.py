"""DVC stage `export`: MindIR prefill/decode graphs of models/merged into models/export; params: export."""

import sys

from glm3.pipeline.run import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("export"))
