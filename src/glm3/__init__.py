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
# MindSpore, `import glm3.convert` stays cheap, and a pipeline stage's code is only the modules it runs (an
# edit to the chat code must not re-run the 12.5 GB download and conversion; see glm3.pipeline.code_deps).
_EXPORTS = {
    "INVALID_TOOL_CALL_MARKER": "glm3.conversation",
    "chat": "glm3.conversation",
    "process_response": "glm3.conversation",
    "stream_chat": "glm3.conversation",
    "CheckpointError": "glm3.checkpoint",
    "hf_to_ms_name": "glm3.checkpoint",
    "ms_to_hf_name": "glm3.checkpoint",
    "PRESETS": "glm3.config",
    "ConfigError": "glm3.config",
    "GLM3Config": "glm3.config",
    "convert_checkpoint": "glm3.convert",
    "quantize_model": "glm3.quantize",
    "QuantizationConfig": "glm3.quantization",
    "DownloadError": "glm3.download",
    "download_from_hub": "glm3.download",
    "generate": "glm3.generation",
    "load_model": "glm3.loading",
    "save_model": "glm3.loading",
    "GLM3ForCausalLM": "glm3.model",
    "write_synthetic_checkpoint": "glm3.synthetic",
    "ChatGLM3Tokenizer": "glm3.tokenizer",
    "TokenizerError": "glm3.tokenizer",
    "load_tokenizer": "glm3.tokenizer",
    "train_sentencepiece": "glm3.tokenizer",
    "ToolCallError": "glm3.tool_call",
    "parse_tool_call": "glm3.tool_call",
    "LoraConfig": "glm3.lora",
    "apply_lora": "glm3.lora",
    "load_adapter": "glm3.lora",
    "merge_lora": "glm3.lora",
    "save_adapter": "glm3.lora",
    "FinetuneConfig": "glm3.train",
    "finetune": "glm3.train",
    "run_finetune": "glm3.train.launch",
}

__version__ = "0.1.0"
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_attributes(globals(), _EXPORTS)
