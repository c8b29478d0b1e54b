"""Stage `adgen_eval`: BLEU-4 and ROUGE of greedy generations of the merged model on ADGEN records."""

from __future__ import annotations

import logging
import os

from glm3.io import atomic_directory
from glm3.pipeline.layout import Layout
from glm3.pipeline.outputs import write_json
from glm3.pipeline.params import project_path

log = logging.getLogger("glm3.pipeline")


def run(params: dict, layout: Layout) -> dict:
    from glm3.eval import evaluate_adgen
    from glm3.modeling.tokenizer import load_tokenizer
    from glm3.weights.loading import load_model, setup_mindspore

    p, model_dir = params["adgen_eval"], layout.outputs["merge"]
    setup_mindspore("graph")
    model, tok = load_model(model_dir), load_tokenizer(model_dir)  # in the merged model's own dtype
    with atomic_directory(layout.outputs["adgen_eval"], overwrite=True) as tmp:
        metrics = evaluate_adgen(
            model,
            tok,
            project_path(layout.root, p["data"]),
            max_source_length=int(p["max_source_length"]),
            max_new_tokens=int(p["max_new_tokens"]),
            batch_size=int(p["batch_size"]),
            limit=p["limit"],
            predictions_path=os.path.join(tmp, "predictions.jsonl"),
        )
    write_json(layout.metrics("adgen_eval", "adgen.json"), metrics)
    log.info("adgen_eval: %s", {k: metrics[k] for k in metrics if k.startswith(("bleu", "rouge"))})
    return metrics
