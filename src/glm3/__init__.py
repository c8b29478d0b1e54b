"""glm3: ChatGLM3 on MindSpore — config, tokenizer, model with KV cache, generation, chat with tools.

    import glm3, mindspore as ms
    tok = glm3.load_tokenizer(model_dir)
    model = glm3.load_model(model_dir, dtype="float32")
    logits = model(ms.Tensor(ids, ms.int32))          # [batch, seq, padded_vocab] float32
    out_ids = model.generate(ids, max_new_tokens=32, do_sample=False)
    response, history = glm3.chat(model, tok, "你好", history=[])
"""
import os as _os

# MindSpore logs every graph-compile warning to stderr by default; keep errors only unless asked.
_os.environ.setdefault("GLOG_v", "3")

from glm3.chat import INVALID_TOOL_CALL_MARKER, chat, process_response, stream_chat  # noqa: E402
from glm3.checkpoint import CheckpointError, hf_to_ms_name, ms_to_hf_name  # noqa: E402
from glm3.config import PRESETS, ConfigError, GLM3Config  # noqa: E402
from glm3.generation import generate  # noqa: E402
from glm3.loading import load_model, save_model  # noqa: E402
from glm3.model import GLM3ForCausalLM  # noqa: E402
from glm3.synthetic import write_synthetic_checkpoint  # noqa: E402
from glm3.tokenizer import ChatGLM3Tokenizer, TokenizerError, load_tokenizer, train_sentencepiece  # noqa: E402
from glm3.tool_call import ToolCallError, parse_tool_call  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "INVALID_TOOL_CALL_MARKER", "PRESETS", "ChatGLM3Tokenizer", "CheckpointError", "ConfigError", "GLM3Config",
    "GLM3ForCausalLM", "TokenizerError", "ToolCallError", "chat", "generate", "hf_to_ms_name", "load_model",
    "load_tokenizer", "ms_to_hf_name", "parse_tool_call", "process_response", "save_model", "stream_chat",
    "train_sentencepiece", "write_synthetic_checkpoint",
]
