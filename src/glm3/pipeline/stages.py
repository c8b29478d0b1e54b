"""The pipeline's stages: `STAGE_FUNCTIONS[name](params, layout) -> summary dict`.

DVC (`python -m stages.<name>`) and the Prefect flow call these same functions; only the Layout differs.
Each stage writes its output directory atomically (complete or absent, whatever fails or is killed) and
then its small metrics files; the summary it returns is what it wrote into metrics.
"""
from __future__ import annotations

import json
import logging
import os

from glm3.io import atomic_directory, atomic_write_text, exclusive_lock, publish_directory
from glm3.pipeline.layout import Layout
from glm3.pipeline.params import ParamsError, project_path

log = logging.getLogger("glm3.pipeline")

PLAN_FILE = "plan.json"  # rank_table's output: the resolved parallel layout and its nodes
RANK_TABLE_FILE = "hccl.json"


def _write_json(path: str, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def download(params: dict, layout: Layout) -> dict:
    """The base checkpoint in HuggingFace layout: from the Hub, or a seeded random-weight stand-in."""
    p, out = params["download"], layout.outputs["download"]
    if p["source"] == "synthetic":
        from glm3.synthetic import write_synthetic_checkpoint

        write_synthetic_checkpoint(out, p["synthetic_preset"], seed=int(p["seed"]), overwrite=True, progress=True)
        summary = {"source": "synthetic", "preset": p["synthetic_preset"], "seed": int(p["seed"])}
    elif p["source"] == "hub":
        from glm3.download import download_from_hub

        result = download_from_hub(out, repo_id=p["repo"], revision=str(p["revision"]), prefer=p["prefer"],
                                   overwrite=True, timeout=float(p["timeout"]))
        summary = {"source": "hub", "repo": result.repo_id, "commit": result.commit}
    else:
        raise ParamsError(f"download.source must be 'synthetic' or 'hub', got {p['source']!r}")
    log.info("download: %s -> %s", summary, out)
    return summary


def convert(params: dict, layout: Layout) -> dict:
    """HuggingFace/PyTorch weights -> MindSpore checkpoint shards (streaming, checked tensor by tensor)."""
    from glm3.convert import convert_checkpoint

    p = params["convert"]
    summary = convert_checkpoint(layout.outputs["download"], layout.outputs["convert"], dtype=p["dtype"],
                                 shard_size=p["shard_size"], overwrite=True, progress=True)
    log.info("convert: %s", summary.describe())
    return {"tensors": summary.tensors, "dtype": summary.dtype, "files": len(summary.files)}


def _parallel_fields(p: dict) -> dict:
    keys = ("data_parallel", "model_parallel", "pipeline_stage", "micro_batch_num", "optimizer_shard",
            "recompute", "master_port", "node_rank")
    return {k: p[k] for k in keys if k in p}


def rank_table(params: dict, layout: Layout) -> dict:
    """The parallel plan (world size; each server's workers and node_rank) and, for Ascend servers, the HCCL
    rank table."""
    from glm3 import rank_table as rt
    from glm3.parallel import ParallelConfig

    p = params["parallel"]
    parallel = ParallelConfig(**_parallel_fields(p))
    parallel.validate(p["device"])  # e.g. model parallelism on CPU fails here, before any training
    servers = p.get("servers") or []
    plan = {"device": p["device"], "world_size": parallel.world_size, "data_parallel": parallel.data_parallel,
            "model_parallel": parallel.model_parallel, "pipeline_stage": parallel.pipeline_stage,
            "rank_table": None, "nodes": [{"ip": "127.0.0.1", "local_workers": parallel.world_size}]}
    with atomic_directory(layout.outputs["rank_table"], overwrite=True) as tmp:
        if servers:
            tables = []
            for i, server in enumerate(servers):
                unknown = sorted(set(server) - {"ip", "devices", "hccn_conf", "device_ips"})
                if unknown or "ip" not in server:
                    raise ParamsError(f"parallel.servers[{i}] needs ip and devices plus hccn_conf or device_ips; "
                                      f"unknown keys: {unknown}")
                tables.append(rt.build_rank_table(server["ip"], server.get("devices", "[0,8)"),
                                                  device_ips=server.get("device_ips"),
                                                  hccn_conf=server.get("hccn_conf")))
            table = rt.merge_rank_tables(tables)
            nodes = [{"ip": s["server_id"], "local_workers": len(s["device"])} for s in table["server_list"]]
            devices = sum(n["local_workers"] for n in nodes)
            if devices != parallel.world_size:
                raise ParamsError(f"the servers have {devices} devices but data_parallel*model_parallel*"
                                  f"pipeline_stage is {parallel.world_size}")
            rt.save_rank_table(table, os.path.join(tmp, RANK_TABLE_FILE))
            plan.update(rank_table=RANK_TABLE_FILE, nodes=nodes)
        for rank, node in enumerate(plan["nodes"]):
            node["node_rank"] = rank
        _write_json(os.path.join(tmp, PLAN_FILE), plan)
    log.info("rank_table: world size %d over %d node(s)%s", plan["world_size"], len(plan["nodes"]),
             ", HCCL rank table written" if servers else "")
    return {"world_size": plan["world_size"], "nodes": len(plan["nodes"])}


def _parallel_config(params: dict, plan_dir: str):
    """ParallelConfig from params.parallel and the rank_table stage's plan (multi-node msrun flags)."""
    from glm3.parallel import ParallelConfig

    with open(os.path.join(plan_dir, PLAN_FILE), encoding="utf-8") as f:
        plan = json.load(f)
    fields = _parallel_fields(params["parallel"])
    node_rank = int(fields.get("node_rank", 0))
    if not 0 <= node_rank < len(plan["nodes"]):
        raise ParamsError(f"parallel.node_rank {node_rank} is not one of the plan's {len(plan['nodes'])} node(s)")
    if plan["rank_table"]:
        fields.update(worker_num=plan["world_size"], local_worker_num=plan["nodes"][node_rank]["local_workers"],
                      master_addr=plan["nodes"][0]["ip"],
                      rank_table_file=os.path.join(plan_dir, plan["rank_table"]))
    return ParallelConfig(**fields)


def finetune_config(params: dict, layout: Layout):
    """The FinetuneConfig of params.finetune, training in a work directory keyed by the settings' fingerprint."""
    from glm3.train import FinetuneConfig

    values = dict(params["finetune"])
    lora = dict(values.pop("lora", None) or {})
    values["lora"] = lora if lora.pop("enabled", False) else None
    values.update(model=layout.outputs["convert"], data=project_path(layout.root, values["data"]),
                  output=layout.work, cache_dir=os.path.join(layout.work, "data_cache"), resume="auto",
                  device=params["parallel"]["device"],
                  parallel=_parallel_config(params, layout.outputs["rank_table"]))
    config = FinetuneConfig.from_dict(values)
    config.output = os.path.join(layout.work, f"finetune-{config.fingerprint()}")
    return config


def finetune(params: dict, layout: Layout) -> dict:
    """Train in models/.work/finetune-<fingerprint> (an interrupted stage resumes there), then publish the run."""
    from glm3.train import TrainingInterrupted
    from glm3.train.checkpoint import list_checkpoints, rank_dir
    from glm3.train.launch import run_finetune
    from glm3.train.trainer import LOG_COLUMNS, LOG_FILE

    config = finetune_config(params, layout)
    out = layout.outputs["finetune"]
    log.info("finetune: %s on %s (lr %g, %s), work dir %s", config.model, config.data, config.lr,
             "LoRA" if config.lora else "full", config.output)
    lock = config.output + ".lock"  # DVC and Prefect runs with the same settings share the work directory
    with exclusive_lock(lock, f"the work directory {config.output}"):
        done = list_checkpoints(rank_dir(config.output, 0))
        if done:
            log.info("finetune: resuming the interrupted run from step %d (%s)", done[-1][0], done[-1][1])
        try:
            result = run_finetune(config)
        except TrainingInterrupted as exc:  # Ctrl-C / SIGTERM: a checkpoint was saved, the next run resumes
            log.warning("finetune: %s; run the stage again to resume", exc)
            raise KeyboardInterrupt from exc
        publish_directory(config.output, out)
        os.unlink(lock)
    metrics = {k: result.metrics.get(k) for k in ("steps", "epochs", "mode", "global_batch_size", "first_loss",
                                                  "final_loss", "min_loss", "tokens_per_second",
                                                  "trainable_parameters")}
    _write_json(layout.metrics("finetune", "finetune.json"), metrics)
    log_path = os.path.join(out, LOG_FILE)  # the loss curve for `dvc plots` (node 0 of a multi-node run logs it)
    curve = "\t".join(LOG_COLUMNS) + "\n"
    if os.path.isfile(log_path):
        with open(log_path, encoding="utf-8") as f:
            curve = f.read()
    atomic_write_text(layout.metrics("finetune", "train_log.tsv"), curve)
    return metrics


def merge(params: dict, layout: Layout) -> dict:
    """Per-rank checkpoints -> one model directory (by the run's strategy files if it was model-parallel)."""
    from glm3.merge import merge_run

    run, p = layout.outputs["finetune"], params["merge"]
    strategy = os.path.join(run, "strategy")
    needs_strategy = params["parallel"]["model_parallel"] > 1 or params["parallel"]["pipeline_stage"] > 1
    summary = merge_run(run, layout.outputs["merge"], layout.outputs["convert"],
                        strategy=strategy if needs_strategy else None, step=p.get("step"), overwrite=True)
    log.info("merge: %s", summary.describe())
    return {"ranks": summary.ranks, "step": summary.step, "method": summary.method, "tensors": summary.tensors}


def export(params: dict, layout: Layout) -> dict:
    """MindIR prefill and decode graphs of the merged model."""
    from glm3.export import ExportConfig, export_model
    from glm3.loading import setup_mindspore

    p = params["export"]
    setup_mindspore("graph")
    out = export_model(layout.outputs["merge"], layout.outputs["export"], batch_size=p["batch_size"],
                       prompt_length=int(p["prompt_length"]), seq_length=p["seq_length"], paged=bool(p["paged"]),
                       block_size=int(p["block_size"]), num_blocks=int(p["num_blocks"]),
                       fused_paged_attention=bool(p["fused_paged_attention"]), overwrite=True)
    config = ExportConfig.load(out)
    log.info("export: %s", out)
    return {"batch_size": config.batch_size, "prompt_length": config.prompt_length,
            "seq_length": config.seq_length, "paged": config.paged}


def evaluate(params: dict, layout: Layout) -> dict:
    """C-Eval accuracy of the exported model (its prefill graph scores the answer letters)."""
    from glm3.eval.ceval import evaluate_ceval
    from glm3.infer import MindIRRunner
    from glm3.loading import setup_mindspore
    from glm3.tokenizer import load_tokenizer

    p, model = params["evaluate"], layout.outputs["export"]
    setup_mindspore("graph")
    with atomic_directory(layout.outputs["evaluate"], overwrite=True) as tmp:
        metrics = evaluate_ceval(MindIRRunner(model).last_logits, load_tokenizer(model),
                                 project_path(layout.root, p["data"]), split=p["split"], shots=int(p["shots"]),
                                 subjects=p["subjects"] or None, batch_size=int(p["batch_size"]),
                                 predictions_path=os.path.join(tmp, "predictions.json"))
        _write_json(os.path.join(tmp, "metrics.json"), metrics)  # with subject names and question counts
    summary = {k: v for k, v in metrics.items() if k != "subjects"}  # flat enough for `dvc metrics show`
    summary["subjects"] = {s: v["accuracy"] for s, v in metrics["subjects"].items() if "accuracy" in v}
    _write_json(layout.metrics("evaluate", "ceval.json"), summary)
    rows = [{"category": c, "accuracy": acc} for c, acc in metrics.get("categories", {}).items()]
    _write_json(layout.metrics("evaluate", "ceval_categories.json"), rows)  # the per-category bar plot
    log.info("evaluate: C-Eval %s average accuracy %s", p["split"], metrics.get("average"))
    return summary


def adgen_eval(params: dict, layout: Layout) -> dict:
    """BLEU-4 and ROUGE of greedy generations of the merged model on ADGEN records."""
    from glm3.eval import evaluate_adgen
    from glm3.loading import load_model, setup_mindspore
    from glm3.tokenizer import load_tokenizer

    p, model_dir = params["adgen_eval"], layout.outputs["merge"]
    setup_mindspore("graph")
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    with atomic_directory(layout.outputs["adgen_eval"], overwrite=True) as tmp:
        metrics = evaluate_adgen(model, tok, project_path(layout.root, p["data"]),
                                 max_source_length=int(p["max_source_length"]),
                                 max_new_tokens=int(p["max_new_tokens"]), batch_size=int(p["batch_size"]),
                                 limit=p["limit"], predictions_path=os.path.join(tmp, "predictions.jsonl"))
    _write_json(layout.metrics("adgen_eval", "adgen.json"), metrics)
    log.info("adgen_eval: %s", {k: metrics[k] for k in metrics if k.startswith(("bleu", "rouge"))})
    return metrics


STAGE_FUNCTIONS = {"download": download, "convert": convert, "rank_table": rank_table, "finetune": finetune,
                   "merge": merge, "export": export, "evaluate": evaluate, "adgen_eval": adgen_eval}
