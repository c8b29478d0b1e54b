"""`glm3` finetune, rank-table: train, on one host or a cluster."""

from __future__ import annotations

import json
import sys

from glm3.cli import common
from glm3.train.settings import FinetuneConfig, LoraConfig


def finetune_config_from_args(args):
    """FinetuneConfig from --config (JSON/YAML) with command-line flags on top."""
    import yaml

    values: dict = {}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            values = (json.load(f) if args.config.endswith(".json") else yaml.safe_load(f)) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{args.config} must hold a mapping of finetune settings")
    values.update({name: getattr(args, dest) for dest, name in args.setting_flags if getattr(args, dest) is not None})
    lora_flags = {name: getattr(args, dest) for dest, name in args.lora_flags if getattr(args, dest) is not None}
    if "targets" in lora_flags:
        lora_flags["targets"] = lora_flags["targets"].split(",")
    if args.lora is False:
        values["lora"] = None
    elif args.lora or values.get("lora") is not None or lora_flags:
        values["lora"] = {**(values.get("lora") or {}), **lora_flags}
    parallel = dict(values.get("parallel") or {})
    for flag, key in (
        ("workers", "data_parallel"),
        ("model_parallel", "model_parallel"),
        ("pipeline_stage", "pipeline_stage"),
        ("master_port", "master_port"),
    ):
        if getattr(args, flag) is not None:
            parallel[key] = getattr(args, flag)
    values["parallel"] = parallel
    if args.quiet:
        values["progress"] = False
    missing = [k for k in ("model", "data", "output") if not values.get(k)]
    if missing:
        raise ValueError(f"finetune needs {', '.join('--' + m for m in missing)} (or a --config that sets them)")
    return FinetuneConfig.from_dict(values)


def cmd_finetune(args) -> int:
    config = finetune_config_from_args(args)
    config.validate()  # bad settings fail in milliseconds, before MindSpore is imported

    from glm3.train.launch import run_finetune
    from glm3.train.trainer import TrainingInterrupted

    try:
        result = run_finetune(config)
    except TrainingInterrupted as exc:
        from glm3.train.signals import ignore_further_stops

        ignore_further_stops()
        print(f"glm3 finetune: {exc}; run the same command again to resume", file=sys.stderr)
        return 128 + exc.signum if exc.signum else 1
    if result.metrics:
        print(json.dumps(result.metrics, indent=2))
    print(f"weights: {result.weights}; checkpoint: {result.checkpoint}")
    return 0


def cmd_rank_table(args) -> int:
    from glm3.train import rank_table as rt

    if args.action == "merge":
        if len(args.tables) < 1:
            raise ValueError("rank-table merge needs one or more rank table files")
        table = rt.merge_rank_tables([rt.load_rank_table(p) for p in args.tables])
    else:
        if args.tables:
            raise ValueError(f"unexpected arguments {args.tables}; did you mean `glm3 rank-table merge`?")
        if not args.server_ip:
            raise ValueError("rank-table needs --server-ip")
        ips = args.device_ips.split(",") if args.device_ips else None
        table = rt.build_rank_table(
            args.server_ip, args.devices, device_ips=ips, hccn_conf=None if ips else args.hccn_conf
        )
    rt.save_rank_table(table, args.out)
    ranks = sum(len(s["device"]) for s in table["server_list"])
    print(f"wrote {args.out}: {table['server_count']} server(s), {ranks} rank(s)")
    return 0


def register(sub) -> None:
    """finetune, rank-table: train, on one host or a cluster."""
    p = sub.add_parser(
        "finetune",
        help="fine-tune a model on ADGEN data (full or LoRA; msrun for several workers)",
        description="Tokenizes the data once into a MindRecord cache, trains with AdamW (warmup + "
        "cosine/linear decay, gradient accumulation, global-norm clipping), logs every step to "
        "OUTPUT/train_log.tsv, writes OUTPUT/metrics.json and OUTPUT/model (full) or OUTPUT/adapter "
        "(LoRA). Checkpoints go to OUTPUT/checkpoint/rank_N; running the same command again resumes "
        "from the newest one, exactly. Ctrl-C/SIGTERM save a checkpoint first. With --workers N > 1 "
        "the command starts N msrun data-parallel workers.",
    )
    p.add_argument("--config", help="JSON or YAML file of finetune settings (FinetuneConfig fields); flags override")
    setting_flags = common.add_settings_flags(p, FinetuneConfig)
    lora = p.add_mutually_exclusive_group()
    lora.add_argument("--lora", dest="lora", action="store_true", default=None, help="train LoRA adapters only")
    lora.add_argument("--full", dest="lora", action="store_false", help="train all parameters")
    lora_flags = common.add_settings_flags(p, LoraConfig, prefix="lora_")
    p.add_argument("--workers", type=int, help="data-parallel workers (msrun)")
    p.add_argument("--model-parallel", type=int, help="tensor-parallel ranks (Ascend/GPU only)")
    p.add_argument("--pipeline-stage", type=int, help="pipeline stages (Ascend/GPU only)")
    p.add_argument("--master-port", type=int, help="msrun scheduler port")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_finetune, setting_flags=setting_flags, lora_flags=lora_flags)

    p = sub.add_parser(
        "rank-table",
        help="build an HCCL rank table for one server, or merge several",
        description="glm3 rank-table --server-ip IP [--devices '[0,8)'] (--hccn-conf FILE | "
        "--device-ips IP,IP,...) --out FILE builds one server's table; glm3 rank-table merge A.json "
        "B.json ... --out FILE joins per-server tables, numbering ranks in server order.",
    )
    p.add_argument(
        "action", nargs="?", choices=["build", "merge"], default="build", help="build (default) or merge tables"
    )
    p.add_argument("tables", nargs="*", help="merge: per-server rank table files, in server order")
    p.add_argument("--server-ip", help="this server's IP (server_id)")
    p.add_argument(
        "--devices",
        default="[0,8)",
        help="the server's device ids, [first,end): the end is excluded whichever bracket closes it, as "
        "MindFormers' hccl_tools.py reads it, so '[0,8]' and '[0,8)' are devices 0-7; within one "
        "4-device group ([0,4), [4,8) or part of one) or all 8 (default: [0,8))",
    )
    p.add_argument("--hccn-conf", default="/etc/hccn.conf", help="file with address_N=IP lines (default %(default)s)")
    p.add_argument("--device-ips", help="comma-separated device IPs in device order, instead of --hccn-conf")
    p.add_argument("--out", required=True, help="output JSON file")
    p.set_defaults(func=cmd_rank_table)
