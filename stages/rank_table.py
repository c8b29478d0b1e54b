"""DVC stage `rank_table`: the parallel plan and, for Ascend servers, the HCCL rank table into
models/rank_table; params: parallel."""

import sys

from glm3.pipeline.run import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("rank_table"))
