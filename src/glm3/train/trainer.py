"""`finetune(FinetuneConfig)`: full-parameter or LoRA fine-tuning of a ChatGLM3 model directory on ADGEN data.

Outputs in `config.output`:
    model/ (full) or adapter/ (LoRA)   the trained weights, written once at the end
    checkpoint/rank_N/step_XXXXXXXX/   resumable training state, every `save_every` steps and at the end
    train_log.tsv                      step, epoch, loss, lr, grad_norm, loss_scale (the loss curve)
    timing.json                        seconds and tokens/s per step (or config.timing_file; see glm3.train.timing)
    metrics.json                       the run's summary (for dvc metrics)
A run resumes from its newest checkpoint (resume="auto") and then continues exactly as if it had never
stopped: same data order, same dropout masks, same losses, same weights. SIGINT/SIGTERM save a checkpoint
at the end of the current step and raise TrainingInterrupted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time

import mindspore as ms
import numpy as np
from mindspore import Tensor

from glm3.data.mindrecord import TrainData, batches_per_epoch, build_train_cache, train_dataset
from glm3.io import atomic_write_text
from glm3.modeling.config import GLM3Config, resolve_dtype
from glm3.train import checkpoint as ckpt
from glm3.train.lora import LoraDropout, apply_lora, save_adapter
from glm3.train.parallel import apply_shard_strategies, init_parallel
from glm3.train.schedule import lr_schedule
from glm3.train.settings import FinetuneConfig
from glm3.train.signals import StopRequests, signal_name
from glm3.train.step import (
    AdamW,
    ApplyAccumulated,
    DynamicLossScale,
    GradientBuffers,
    MeanAllReduce,
    OptimizerUpdate,
    TrainStep,
)
from glm3.train.timing import RunTiming

log = logging.getLogger(__name__)

LOG_FILE = "train_log.tsv"
METRICS_FILE = "metrics.json"
TIMING_FILE = "timing.json"
LOG_COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "loss_scale")


class TrainingInterrupted(RuntimeError):
    def __init__(self, signum: int, step: int, checkpoint: str):
        super().__init__(f"stopped by {signal_name(signum)} after step {step}; checkpoint saved to {checkpoint}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


@dataclasses.dataclass
class FinetuneResult:
    output: str
    steps: int
    final_loss: float
    metrics: dict
    weights: str | None  # model/ or adapter/ (rank 0 only)
    checkpoint: str
    timing: dict = dataclasses.field(default_factory=dict)  # RunTiming.summary() (rank 0 only)


def prepare_data(config: FinetuneConfig) -> TrainData:
    """Tokenize (or find cached) the training data; the launcher does this once before starting workers."""
    from glm3.modeling.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(config.tokenizer or config.model)
    return build_train_cache(
        config.data,
        tokenizer,
        config.cache_dir or os.path.join(config.output, "data_cache"),
        config.max_source_length,
        config.max_target_length,
        config.seq_length,
        config.preprocess,
        config.ignore_pad_token_for_loss,
        config.skip_bad_lines,
    )


def total_steps(config: FinetuneConfig, data: TrainData, ranks: int) -> tuple[int, int]:
    """(optimizer steps, micro-batches per epoch per rank)."""
    per_epoch = batches_per_epoch(data.num_examples, config.batch_size, ranks)
    if per_epoch < 1:
        raise ValueError(
            f"{data.num_examples} examples are too few for batch_size {config.batch_size} on {ranks} "
            "rank(s): not one full batch per rank"
        )
    steps = config.steps or max(1, math.ceil(config.epochs * per_epoch / config.grad_accumulation))
    if config.warmup_steps > steps:  # checked here, before the model is loaded, when steps come from epochs
        raise ValueError(f"warmup_steps ({config.warmup_steps}) exceeds the run's {steps} optimizer step(s)")
    return steps, per_epoch


def _batches(config, data, rank, ranks, per_epoch, micro_step):
    """(epoch, batch) from micro-step `micro_step` on, reshuffling every epoch."""
    epoch, skip = divmod(micro_step, per_epoch)
    while True:
        dataset = train_dataset(
            data,
            config.batch_size,
            seed=config.seed,
            epoch=epoch,
            shuffle=config.shuffle,
            num_shards=ranks,
            shard_id=rank,
            skip_batches=skip,
        )
        for input_ids, labels in dataset.create_tuple_iterator(num_epochs=1):
            yield epoch, input_ids, labels
        epoch, skip = epoch + 1, 0


class _Log:
    """The per-step TSV: rewritten up to the resumed step, then appended and flushed every step."""

    def __init__(self, path: str | None, start_step: int):
        self.path = path
        if path is None:
            return
        rows = []
        if start_step > 0 and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                rows = [line for line in f.read().splitlines()[1:] if line and int(line.split("\t")[0]) <= start_step]
        atomic_write_text(path, "\n".join(["\t".join(LOG_COLUMNS), *rows]) + "\n")

    def write(self, values: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("\t".join(_fmt(values[c]) for c in LOG_COLUMNS) + "\n")


def _fmt(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


@dataclasses.dataclass
class _Graphs:
    """The compiled pieces of one optimizer step and the state a checkpoint must hold."""

    micro_step: TrainStep
    apply: ApplyAccumulated | None
    loss_scale: DynamicLossScale | None
    lrs: np.ndarray
    state: list  # trainable parameters + optimizer state (+ loss scale)


def _build_graphs(config: FinetuneConfig, model, steps: int, ranks: int) -> _Graphs:
    trainable = model.trainable_params()
    lrs = lr_schedule(config.lr, steps, config.warmup_steps, config.lr_schedule, config.min_lr)
    optimizer = AdamW(
        trainable, Tensor(lrs), config.weight_decay, (config.adam_beta1, config.adam_beta2), config.adam_eps
    )
    loss_scale = (
        DynamicLossScale(config.loss_scale, config.loss_scale_window) if config.compute_dtype != "float32" else None
    )
    # Data parallel reduces explicitly; semi-auto parallel (Ascend) inserts its own communication.
    explicit_dp = ranks > 1 and not config.parallel.needs_auto_parallel
    reducer = ms.nn.DistributedGradReducer(optimizer.params, mean=True, degree=ranks) if explicit_dp else None
    update = OptimizerUpdate(optimizer, config.max_grad_norm, reducer, loss_scale)
    loss_reducer = MeanAllReduce(ranks) if explicit_dp else None
    micro = config.parallel.micro_batch_num if config.parallel.pipeline_stage > 1 else 1
    if config.grad_accumulation == 1:
        micro_step, apply = TrainStep(model, update, "fused", None, loss_reducer, micro), None
    else:
        buffers = GradientBuffers(optimizer.params)
        micro_step = TrainStep(model, update, "accumulate", buffers, loss_reducer, micro)
        apply = ApplyAccumulated(update, buffers)
    state = list(trainable) + optimizer.state()
    if loss_scale is not None:
        state += [loss_scale.scale, loss_scale.clean_steps]
    return _Graphs(micro_step, apply, loss_scale, lrs, state)


def _resume(config: FinetuneConfig, ckpt_dir: str, state: list, fingerprint: str) -> tuple[str | None, dict | None]:
    """(checkpoint path, its meta) after loading it into `state`, or (None, None) for a fresh start."""
    path = None
    if config.resume == "auto":
        found = ckpt.list_checkpoints(ckpt_dir)
        path = found[-1][1] if found else None
    elif config.resume != "never":
        path = config.resume
    if path is None:
        return None, None
    meta = ckpt.load_checkpoint(path, state)
    if meta.get("fingerprint") != fingerprint:
        raise ckpt.ResumeError(
            f"checkpoint {path} belongs to a run with different settings (model, data, batch, "
            "schedule, LoRA or parallel config); use a new output directory or resume='never'"
        )
    return path, meta


def timing_path(config: FinetuneConfig) -> str:
    """Where the run's timing goes: config.timing_file, or <output>/timing.json."""
    return config.timing_file or os.path.join(config.output, TIMING_FILE)


def training_dtype(config: FinetuneConfig) -> str:
    """The storage dtype of the model's weights during training (see FinetuneConfig.dtype)."""
    if config.dtype != "auto":
        return config.dtype
    return resolve_dtype("auto", GLM3Config.from_hf(config.model)) if config.lora is not None else "float32"


def memory_estimate(config: FinetuneConfig):
    """What one rank of this run needs (glm3.memory), from the model's config.json and the settings alone."""
    from glm3.memory import finetune_estimate
    from glm3.train.lora import adapter_shapes

    model_config = GLM3Config.from_hf(config.model)
    trainable = None
    if config.lora is not None:
        trainable = sum(a * b for a, b in adapter_shapes(model_config, config.lora).values())
    return finetune_estimate(
        model_config, training_dtype(config), trainable, config.batch_size, config.seq_length, config.grad_accumulation
    )


def _describe_setup(config: FinetuneConfig, model) -> str:
    """One line on how the weights are held, for the log: what the trainer chose and why."""
    dtype = training_dtype(config)
    if config.lora is None:
        return f"full fine-tuning: {dtype} weights, float32 gradients and Adam moments"
    if dtype == "float32":
        return "LoRA over a float32 base"
    kernels = "the CPU kernels read it as stored" if model.kernels_backend == "cpu" else "cast per layer"
    return (
        f"LoRA over a {dtype} base: the frozen base stays {dtype} ({kernels}) and its backward computes only "
        "input gradients, so no float32 copy of it is made; adapters and their Adam state are float32"
    )


@dataclasses.dataclass
class TrainingRun:
    """A run between setup() and finish(): its settings, data, model, compiled step and progress."""

    config: FinetuneConfig
    rank: int
    ranks: int
    data: TrainData
    steps: int  # optimizer steps in all
    per_epoch: int  # micro-batches per epoch per rank
    model: object
    dropout: LoraDropout | None
    graphs: _Graphs
    fingerprint: str
    start_step: int  # where this process starts (a resumed run: its checkpoint's step)
    last_checkpoint: str | None
    history: dict  # {"losses": [...]} of every step so far, resumes included
    timing: RunTiming

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def save(self, step: int) -> str:
        """A checkpoint of step `step` (and the timing so far); returns its directory."""
        c = self.config
        state = {
            "fingerprint": self.fingerprint,
            "micro_step": step * c.grad_accumulation,
            "epoch": step * c.grad_accumulation // self.per_epoch,
            "history": self.history,
            "dropout_rng": self.dropout.state() if self.dropout is not None else None,
        }
        self.last_checkpoint = ckpt.save_checkpoint(
            ckpt.rank_dir(c.output, self.rank), step, self.graphs.state, state, c.keep_checkpoints
        )
        self.timing.write()
        return self.last_checkpoint


def setup(config: FinetuneConfig) -> TrainingRun:
    """Check the settings, join the process group, tokenize the data, load the model (with LoRA, shard
    strategies), build the compiled step and resume from the newest checkpoint."""
    from glm3.weights.loading import load_model

    config.validate()
    os.makedirs(config.output, exist_ok=True)
    rank, ranks = init_parallel(config.parallel, os.path.join(config.output, "strategy"))
    data = prepare_data(config)
    if data.bad_lines and rank == 0:
        log.warning("finetune: skipped %d malformed line(s) of %s (skip_bad_lines)", data.bad_lines, config.data)
    steps, per_epoch = total_steps(config, data, ranks)
    ms.set_seed(config.seed)

    from glm3.modeling.config import GLM3Config

    if GLM3Config.from_hf(config.model).quantization is not None:
        raise ValueError(
            f"{config.model} is a quantized model: fine-tune its float source, then quantize (glm3 quantize)"
        )
    # On CPU our kernels carry a half-precision frozen base (no float32 copies); elsewhere MindSpore's ops.
    model = load_model(
        config.model,
        dtype=training_dtype(config),
        compute_dtype=config.compute_dtype,
        kernels_backend="auto" if config.device.upper() == "CPU" else "plain",
    )
    if rank == 0:
        log.info("finetune: %s", _describe_setup(config, model))
    if data.seq_length > model.config.seq_length:
        raise ValueError(
            f"examples are {data.seq_length} tokens but the model's seq_length is {model.config.seq_length}"
        )
    dropout = None
    if config.lora is not None:
        apply_lora(model, config.lora, seed=config.seed)
        dropout = LoraDropout(model, config.batch_size * data.seq_length, seed=config.seed * 7919 + rank)
    if config.parallel.needs_auto_parallel:
        apply_shard_strategies(model, config.parallel)
    model.set_train(True)
    graphs = _build_graphs(config, model, steps, ranks)

    fingerprint = config.fingerprint()
    last_path, meta = _resume(config, ckpt.rank_dir(config.output, rank), graphs.state, fingerprint)
    start_step = meta["step"] if meta else 0
    if meta and dropout is not None:
        dropout.restore(meta["dropout_rng"])
    return TrainingRun(
        config,
        rank,
        ranks,
        data,
        steps,
        per_epoch,
        model,
        dropout,
        graphs,
        fingerprint,
        start_step,
        last_path,
        meta["history"] if meta else {"losses": []},
        RunTiming(timing_path(config) if rank == 0 else None, start_step),
    )


def fit(run: TrainingRun) -> None:
    """The training loop from run.start_step to run.steps: a step, its log row and timing, a checkpoint every
    save_every steps and at the end. SIGINT/SIGTERM (or stop_after) end it after a step, with a checkpoint,
    by raising TrainingInterrupted."""
    from tqdm import tqdm

    c, graphs, model = run.config, run.graphs, run.model
    train_log = _Log(os.path.join(c.output, LOG_FILE) if run.is_main else None, run.start_step)
    tokens_per_step = c.batch_size * run.data.seq_length * run.ranks * c.grad_accumulation
    batches = _batches(c, run.data, run.rank, run.ranks, run.per_epoch, run.start_step * c.grad_accumulation)
    bar = tqdm(
        total=run.steps,
        initial=run.start_step,
        desc="finetune",
        unit="step",
        disable=not (c.progress and run.is_main),
        dynamic_ncols=True,
    )
    with StopRequests() as stop:
        for step in range(run.start_step, run.steps):
            t0 = time.perf_counter()
            loss_sum = tokens = 0.0
            real_tokens = 0
            for micro in range(c.grad_accumulation):
                epoch, input_ids, labels = next(batches)
                if run.ranks > 1 and step == run.start_step and micro == 0:  # each worker's log: its own data
                    digest = hashlib.sha1(input_ids.asnumpy().tobytes()).hexdigest()[:12]
                    print(f"rank {run.rank}: step {step + 1} first batch {digest}", flush=True)
                if run.dropout is not None:
                    run.dropout.refresh()
                loss, count, norm = graphs.micro_step(input_ids, labels)
                # Non-padding positions of this rank's batch, times the ranks (their batches are alike in size).
                real_tokens += int((input_ids.asnumpy() != model.config.pad_token_id).sum()) * run.ranks
                loss_sum, tokens = loss_sum + float(loss.asnumpy()), tokens + float(count.asnumpy())
            if graphs.apply is not None:  # accumulated: summed losses over all micro-batches' tokens
                norm, loss = graphs.apply(), loss_sum / max(tokens, 1.0)
            else:
                loss = loss_sum
            run.timing.record(
                step + 1, time.perf_counter() - t0, tokens_per_step, real_tokens, compiled=step == run.start_step
            )  # a process's first step compiles the graphs
            run.history["losses"].append(loss)
            scale = float(graphs.loss_scale.scale.asnumpy()) if graphs.loss_scale is not None else 1.0
            train_log.write(
                {
                    "step": step + 1,
                    "epoch": epoch,
                    "loss": loss,
                    "lr": float(graphs.lrs[step]),
                    "grad_norm": float(norm.asnumpy()),
                    "loss_scale": scale,
                }
            )
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{graphs.lrs[step]:.2e}")
            done = step + 1
            if (c.save_every and done % c.save_every == 0) or done == run.steps:
                run.save(done)
            stopping = stop.signum is not None or (c.stop_after is not None and done >= c.stop_after)
            if stopping and done < run.steps:
                if run.last_checkpoint is None or not run.last_checkpoint.endswith(f"step_{done:08d}"):
                    run.save(done)
                bar.close()
                raise TrainingInterrupted(stop.signum or 0, done, run.last_checkpoint)
    bar.close()


def finish(run: TrainingRun) -> FinetuneResult:
    """The trained weights (adapter/, or model/ in the checkpoint's dtype), metrics.json and the timing."""
    from glm3.weights.loading import save_model

    c, weights = run.config, None
    if run.is_main:
        run.model.set_train(False)
        if c.lora is not None:
            weights = save_adapter(run.model, os.path.join(c.output, "adapter"), overwrite=True)
        else:
            base_dtype = resolve_dtype("auto", GLM3Config.from_hf(c.model))
            weights = save_model(
                run.model,
                os.path.join(c.output, "model"),
                tokenizer_dir=c.tokenizer or c.model,
                overwrite=True,
                dtype=base_dtype,
            )
    metrics = _summary(c, run.model, run.data, run.history, run.steps, run.ranks, run.per_epoch)
    if run.is_main:
        atomic_write_text(os.path.join(c.output, METRICS_FILE), json.dumps(metrics, indent=2) + "\n")
        run.timing.write()
    return FinetuneResult(
        c.output, run.steps, metrics["final_loss"], metrics, weights, run.last_checkpoint, run.timing.summary()
    )


def finetune(config: FinetuneConfig) -> FinetuneResult:
    """Train in this process (a single worker, or one rank under msrun). See the module docstring."""
    run = setup(config)
    fit(run)
    return finish(run)


def _summary(config, model, data, history, steps, ranks, per_epoch) -> dict:
    """The run's results: the same inputs give the same numbers (speeds are in the timing file)."""
    losses = history["losses"]
    return {
        "steps": steps,
        "ranks": ranks,
        "mode": "lora" if config.lora else "full",
        "micro_batch_size": config.batch_size,
        "global_batch_size": config.batch_size * config.grad_accumulation * ranks,
        "examples": data.num_examples,
        "seq_length": data.seq_length,
        "epochs": round(steps * config.grad_accumulation / per_epoch, 4),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "min_loss": min(losses) if losses else None,
        "skipped_lines": data.bad_lines,
        "skipped_records": data.skipped,
        "trainable_parameters": _numel(model.trainable_params()),
        "total_parameters": _numel(p for p in model.get_parameters() if not p.name.endswith(".lora_mask")),
    }


def _numel(params) -> int:
    return int(sum(np.prod(p.shape) for p in params))
