"""Stage `evaluate`: C-Eval accuracy of the exported model (its prefill graph scores the answer letters)."""

from __future__ import annotations

import logging
import os

from glm3.io import atomic_directory
from glm3.pipeline import plots
from glm3.pipeline.layout import Layout
from glm3.pipeline.outputs import write_json
from glm3.pipeline.params import project_path

log = logging.getLogger("glm3.pipeline")


def run(params: dict, layout: Layout) -> dict:
    from glm3.deploy.infer import MindIRRunner
    from glm3.eval.ceval import evaluate_ceval
    from glm3.modeling.tokenizer import load_tokenizer
    from glm3.weights.loading import setup_mindspore

    p, model = params["evaluate"], layout.outputs["export"]
    setup_mindspore("graph")
    with atomic_directory(layout.outputs["evaluate"], overwrite=True) as tmp:
        metrics = evaluate_ceval(
            MindIRRunner(model).last_logits,
            load_tokenizer(model),
            project_path(layout.root, p["data"]),
            split=p["split"],
            shots=int(p["shots"]),
            subjects=p["subjects"] or None,
            batch_size=int(p["batch_size"]),
            predictions_path=os.path.join(tmp, "predictions.json"),
        )
        write_json(os.path.join(tmp, "metrics.json"), metrics)  # with subject names and question counts
    summary = {k: v for k, v in metrics.items() if k != "subjects"}  # flat enough for `dvc metrics show`
    summary["subjects"] = {s: v["accuracy"] for s, v in metrics["subjects"].items() if "accuracy" in v}
    write_json(layout.metrics("evaluate", "ceval.json"), summary)
    rows = [{"category": c, "accuracy": acc} for c, acc in metrics.get("categories", {}).items()]
    write_json(layout.metrics("evaluate", "ceval_categories.json"), rows)
    plots.category_bars(
        metrics.get("categories", {}),
        layout.metrics("evaluate", "ceval_categories.png"),
        title=f"C-Eval {p['split']} accuracy per category",
    )
    log.info("evaluate: C-Eval %s average accuracy %s", p["split"], metrics.get("average"))
    return summary
