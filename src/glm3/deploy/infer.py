"""Running an exported model: the prefill and decode MindIR graphs behind a model runner
(glm3.runtime.model_runner), driven by the same engine as the eager model (glm3.runtime.engine), so both give
the same tokens.

An export whose graphs take their weights as inputs (glm3.deploy.export, the default) has its weights loaded once,
from the checkpoint beside the graphs (checked tensor by tensor), and fed to both graphs on every call.

Graphs load with MindSpore Lite when it is importable, else with MindSpore's GraphCell (MindSpore Lite has no
wheel for Python 3.11 on the registry, so the tests here run GraphCell).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import numpy as np

from glm3.deploy.export import DECODE, PREFILL, ExportConfig, ExportError, graph_file
from glm3.runtime.sampling import SamplingParams

PROMPT_MARKER = "Please enter your predict data:"


class _LiteGraph:
    """A MindSpore Lite model called like the GraphCell: tuple inputs are flattened, and the outputs come back
    as (logits, (cache tensors...)). Not exercised here: MindSpore Lite has no wheel for this Python."""

    def __init__(self, path: str, lite):
        context = lite.Context()
        context.target = [os.environ.get("GLM3_LITE_TARGET", "cpu")]
        self.model = lite.Model()
        self.model.build_from_file(path, lite.ModelType.MINDIR, context)

    def __call__(self, *args):
        from mindspore import Tensor

        arrays = []
        for arg in args:
            for t in arg if isinstance(arg, (tuple, list)) else (arg,):
                arrays.append(t.asnumpy())
        inputs = self.model.get_inputs()
        self.model.resize(inputs, [list(a.shape) for a in arrays])
        for tensor, array in zip(inputs, arrays):
            tensor.set_data_from_numpy(array)
        outputs = [Tensor(o.get_data_to_numpy()) for o in self.model.predict(inputs)]
        return outputs[0], tuple(outputs[1:])


def _load_graph(path: str):
    """(graph, backend name): MindSpore Lite if importable, else MindSpore's GraphCell."""
    try:
        import mindspore_lite as lite
    except ImportError:
        import mindspore as ms
        from mindspore import nn

        return nn.GraphCell(ms.load(path)), "GraphCell"
    return _LiteGraph(path, lite), "mindspore_lite"


class _WithWeights:
    """A graph whose weights are inputs, called with its own inputs only: the weights follow them."""

    def __init__(self, graph, weights: tuple):
        self.graph, self.weights = graph, weights

    def __call__(self, *args):
        return self.graph(*args, *self.weights)


def load_export_weights(directory: str, config: ExportConfig) -> tuple:
    """The export's weights as MindSpore tensors in its dtype, in the graphs' input order, read once (every
    tensor checked against config.json: name, shape, floating dtype)."""
    import mindspore as ms

    from glm3.dtypes import to_mindspore
    from glm3.modeling.config import GLM3Config
    from glm3.quantization import SCALE_SUFFIX
    from glm3.weights.checkpoint import iter_checkpoint
    from glm3.weights.loading import as_param_data

    model_config = GLM3Config.from_hf(directory)
    dtype = to_mindspore(config.dtype)
    tensors = {
        name: as_param_data(array, ms.float16 if name.endswith(SCALE_SUFFIX) else dtype)
        for name, array, _ in iter_checkpoint(directory, model_config)
    }
    missing = [n for n in config.weight_names if n not in tensors]
    if missing or len(tensors) != len(config.weight_names):
        raise ExportError(
            f"{directory}: the weights beside the graphs do not match their inputs (missing "
            f"{missing[:3]}, {len(tensors)} tensors for {len(config.weight_names)} inputs)"
        )
    return tuple(tensors.pop(name) for name in config.weight_names)


class MindIRRunner:
    """Generation from an export directory (see glm3.deploy.export). `backend` says what loaded the graphs."""

    def __init__(self, directory: str | os.PathLike):
        directory = os.fspath(directory)
        self.config = ExportConfig.load(directory)
        prefill_path, decode_path = graph_file(directory, PREFILL), graph_file(directory, DECODE)
        if self.config.fused_paged_attention and importlib.util.find_spec("mindspore_lite") is None:
            raise ExportError(
                f"{directory} uses the fused PagedAttention operator, which only MindSpore Lite "
                "(on Ascend) runs; export without --fused-paged-attention to run it here"
            )
        weights = ()
        if self.config.weights == "inputs":
            from glm3.memory import check_memory, inference_estimate
            from glm3.modeling.config import GLM3Config

            batch = self.config.batch_size or 1
            check_memory(
                inference_estimate(
                    GLM3Config.from_hf(directory),
                    self.config.dtype,
                    batch,
                    self.config.seq_length,
                    kernels=False,
                    what="running the export",
                )
            )
            weights = load_export_weights(directory, self.config)
        self.prefill, self.backend = _load_graph(prefill_path)
        self.decode, _ = _load_graph(decode_path)
        if weights:
            self.prefill, self.decode = _WithWeights(self.prefill, weights), _WithWeights(self.decode, weights)

    def _checked(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        c = self.config
        prompts = [[int(t) for t in p] for p in prompts]
        if not prompts or any(not p for p in prompts):
            raise ExportError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        if longest > c.prompt_length:
            raise ExportError(
                f"a prompt has {longest} tokens; this export takes at most {c.prompt_length} "
                "(export again with a larger prompt length)"
            )
        if any(not 0 <= t < c.vocab_size for p in prompts for t in p):
            raise ExportError(f"token ids must be in [0, {c.vocab_size})")
        return prompts

    def model_runner(self, batch: int, together: bool):
        """The runner of these graphs (glm3.runtime.model_runner) for calls of `batch` rows (an export's static
        batch is its own); together: prefill the admitted prompts in one call (else one each)."""
        from glm3.runtime.model_runner import PagedRunner, StaticRunner, StepShapes

        c = self.config
        rows = c.batch_size or batch
        if not c.paged:
            return StaticRunner(self.prefill, self.decode, c.seq_length, rows, c.prompt_length, c.pad_token_id)
        shapes = StepShapes(
            c.max_blocks,
            prompt_width=c.prompt_length,
            prefill_batch=c.batch_size,
            together=together,
            decode_widths=(rows,),
            table_width=c.max_blocks,
        )
        return PagedRunner(self.prefill, self.decode, c.geometry, shapes, c.pad_token_id)

    def last_logits(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """[len(prompts), vocab] logits at each prompt's last position, from the prefill graph alone (in
        batches of the export's size)."""
        prompts = self._checked(prompts)
        step = self.config.batch_size or len(prompts)
        runner = self.model_runner(step, together=True)
        return np.concatenate([runner.prompt_logits(prompts[i : i + step]) for i in range(0, len(prompts), step)])

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> list[list[int]]:
        """New tokens of each prompt (stop token included), in batches of the export's size. stop_token_ids:
        the tokens that end a prompt's generation (default: the export's; [] generates max_new_tokens)."""
        from glm3.runtime.engine import Engine, EngineConfig, ModelLimits
        from glm3.runtime.generation import run_batch
        from glm3.runtime.kv_cache_manager import KVCacheManager

        c = self.config
        sampling = SamplingParams(do_sample, temperature, top_k, top_p, repetition_penalty, seed)
        if c.prompt_length + max_new_tokens > c.seq_length:
            raise ExportError(
                f"prompt_length {c.prompt_length} + max_new_tokens {max_new_tokens} exceeds the "
                f"exported cache of {c.seq_length}"
            )
        prompts = self._checked(prompts)
        batch = c.batch_size or len(prompts)
        runner = self.model_runner(batch, together=True)
        if c.paged:
            kv = KVCacheManager.paged(c.cache_config, c.max_blocks)
        else:  # a row of seq_length columns per sequence
            kv = KVCacheManager(batch, c.seq_length, max_blocks_per_seq=1)
        limits = ModelLimits(c.seq_length, c.prompt_length, c.vocab_size, frozenset(c.stop_token_ids))
        engine = Engine(
            runner, limits, EngineConfig(max_num_seqs=batch, max_queue=len(prompts)), kv=kv, raise_errors=True
        )
        # A row's sampling generator is its index in the export's batch, as when the batches ran one by one.
        indices = [i % batch for i in range(len(prompts))]
        seqs = run_batch(engine, prompts, sampling, max_new_tokens, indices, stop_token_ids)
        return [seq.output for seq in seqs]
