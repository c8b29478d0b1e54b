"""Stage `finetune`: train in models/.work/finetune-<fingerprint> (an interrupted stage resumes there), then
publish the run and its loss curve."""

from __future__ import annotations

import logging
import os

from glm3.io import atomic_write_text, exclusive_lock, publish_directory
from glm3.pipeline import plots
from glm3.pipeline.layout import Layout
from glm3.pipeline.outputs import write_json
from glm3.pipeline.params import project_path
from glm3.pipeline.plan import parallel_config

log = logging.getLogger("glm3.pipeline")


def timing_file(layout: Layout) -> str:
    """The run's timing, beside the stage's output and not in it: wall-clock figures differ on every run, and
    an output that changed with them would defeat DVC's hashes and run cache."""
    return layout.outputs["finetune"] + ".timing.json"


def finetune_config(params: dict, layout: Layout):
    """The FinetuneConfig of params.finetune, training in a work directory keyed by the settings' fingerprint."""
    from glm3.train import FinetuneConfig

    values = dict(params["finetune"])
    lora = dict(values.pop("lora", None) or {})
    values["lora"] = lora if lora.pop("enabled", False) else None
    values.update(
        model=layout.outputs["convert"],
        data=project_path(layout.root, values["data"]),
        output=layout.work,
        cache_dir=os.path.join(layout.work, "data_cache"),
        resume="auto",
        timing_file=timing_file(layout),
        device=params["parallel"]["device"],
        parallel=parallel_config(params, layout.outputs["rank_table"]),
    )
    config = FinetuneConfig.from_dict(values)
    config.output = os.path.join(layout.work, f"finetune-{config.fingerprint()}")
    return config


def run(params: dict, layout: Layout) -> dict:
    """Train in models/.work/finetune-<fingerprint> (an interrupted stage resumes there), then publish the run."""
    config = finetune_config(params, layout)
    config.validate()  # bad settings fail here: before MindSpore is imported and before anything is written

    from glm3.train.checkpoint import list_checkpoints, rank_dir
    from glm3.train.launch import run_finetune
    from glm3.train.trainer import LOG_COLUMNS, LOG_FILE, TrainingInterrupted

    out = layout.outputs["finetune"]
    log.info(
        "finetune: %s on %s (lr %g, %s), work dir %s",
        config.model,
        config.data,
        config.lr,
        "LoRA" if config.lora else "full",
        config.output,
    )
    lock = config.output + ".lock"  # DVC and Prefect runs with the same settings share the work directory
    with exclusive_lock(lock, f"the work directory {config.output}"):
        try:
            done = list_checkpoints(rank_dir(config.output, 0))
            if done:
                log.info("finetune: resuming the interrupted run from step %d (%s)", done[-1][0], done[-1][1])
            try:
                result = run_finetune(config)
            except TrainingInterrupted as exc:  # Ctrl-C / SIGTERM: a checkpoint was saved, the next run resumes
                from glm3.train.signals import ignore_further_stops

                ignore_further_stops()  # this process ends now; a follow-up SIGTERM must not cut its report
                log.warning("finetune: %s; run the stage again to resume", exc)
                raise KeyboardInterrupt from exc
            publish_directory(config.output, out)
        finally:
            os.unlink(lock)  # ours while we hold it; the kernel drops the lock itself however we exit
    metrics = {
        k: result.metrics.get(k)
        for k in (
            "steps",
            "epochs",
            "mode",
            "global_batch_size",
            "first_loss",
            "final_loss",
            "min_loss",
            "skipped_lines",
            "skipped_records",
            "trainable_parameters",
        )
    }
    if result.timing.get("tokens_per_second"):
        log.info(
            "finetune: %.3f s per step, %.0f tokens/s (%.0f without padding); timing in %s",
            result.timing["step_seconds"],
            result.timing["tokens_per_second"],
            result.timing["real_tokens_per_second"],
            timing_file(layout),
        )
    write_json(layout.metrics("finetune", "finetune.json"), metrics)
    log_path = os.path.join(out, LOG_FILE)  # the loss curve for `dvc plots` (node 0 of a multi-node run logs it)
    curve = "\t".join(LOG_COLUMNS) + "\n"
    if os.path.isfile(log_path):
        with open(log_path, encoding="utf-8") as f:
            curve = f.read()
    atomic_write_text(layout.metrics("finetune", "train_log.tsv"), curve)
    plots.loss_curve(layout.metrics("finetune", "train_log.tsv"), layout.metrics("finetune", "loss.png"))
    return metrics
