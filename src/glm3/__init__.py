"""glm3: ChatGLM3 on MindSpore — config, tokenizer, model with KV cache, generation, chat with tools.

import glm3, mindspore as ms
tok = glm3.load_tokenizer(model_dir)
model = glm3.load_model(model_dir, dtype="float32")
logits = model(ms.Tensor(ids, ms.int32))          # [batch, seq, padded_vocab] float32
out_ids = glm3.generate(model, ids, max_new_tokens=32, do_sample=False)
response, history = glm3.chat(model, tok, "你好", history=[])
"""

import os as _os

from glm3.lazy import lazy_attributes

# MindSpore logs every graph-compile warning to stderr by default; keep errors only unless asked.
_os.environ.setdefault("GLOG_v", "3")

# Every name is imported on first use, so light commands (download, convert) do not pay for importing
# MindSpore, `import glm3.weights.convert` stays cheap, and a pipeline stage's code is only the modules it runs (an
# edit to the chat code must not re-run the 12.5 GB download and conversion; see glm3.pipeline.code_deps).
_EXPORTS = {
    "INVALID_TOOL_CALL_MARKER": "glm3.dialog.conversation",
    "chat": "glm3.dialog.conversation",
    "process_response": "glm3.dialog.conversation",
    "stream_chat": "glm3.dialog.conversation",
    "CheckpointError": "glm3.weights.checkpoint",
    "hf_to_ms_name": "glm3.weights.checkpoint",
    "ms_to_hf_name": "glm3.weights.checkpoint",
    "PRESETS": "glm3.modeling.config",
    "ConfigError": "glm3.modeling.config",
    "GLM3Config": "glm3.modeling.config",
    "convert_checkpoint": "glm3.weights.convert",
    "quantize_model": "glm3.weights.quantize",
    "QuantizationConfig": "glm3.quantization",
    "DownloadError": "glm3.weights.download",
    "download_from_hub": "glm3.weights.download",
    "generate": "glm3.runtime.generation",
    "load_model": "glm3.weights.loading",
    "save_model": "glm3.weights.loading",
    "GLM3ForCausalLM": "glm3.modeling.model",
    "write_synthetic_checkpoint": "glm3.weights.synthetic",
    "ChatGLM3Tokenizer": "glm3.modeling.tokenizer",
    "TokenizerError": "glm3.modeling.tokenizer",
    "load_tokenizer": "glm3.modeling.tokenizer",
    "train_sentencepiece": "glm3.modeling.tokenizer",
    "ToolCallError": "glm3.dialog.tool_call",
    "parse_tool_call": "glm3.dialog.tool_call",
    "LoraConfig": "glm3.train.lora",
    "apply_lora": "glm3.train.lora",
    "load_adapter": "glm3.train.lora",
    "merge_lora": "glm3.train.lora",
    "save_adapter": "glm3.train.lora",
    "FinetuneConfig": "glm3.train",
    "finetune": "glm3.train",
    "run_finetune": "glm3.train.launch",
}

__version__ = "0.1.0"
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_attributes(globals(), _EXPORTS)
