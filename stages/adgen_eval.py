"""DVC stage `adgen_eval`: BLEU/ROUGE of the merged model on ADGEN records (metrics/adgen.json); params: adgen_eval."""

import sys

from glm3.pipeline.run import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("adgen_eval"))
