"""DVC stage `finetune`: fine-tune models/ms on the ADGEN data into models/finetune; params: finetune, parallel."""

import sys

from glm3.pipeline.run import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("finetune"))
