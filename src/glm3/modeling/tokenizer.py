"""ChatGLM3's tokenizer: SentencePiece plus nine special tokens appended after its vocabulary.

Ids, message layout and decoding follow the released tokenizer exactly (see docs in README):
- encode(text) is plain SentencePiece, no bos/eos; special-token text typed by a user stays plain text
  (allow_special=True turns the four role tokens into their ids, as the release's encode_special_tokens).
- a message is [<|role|>] + encode(metadata + "\\n") + encode(content);
- build_chat_input = [gMASK, sop] + history messages + the new message + [<|assistant|>];
- decode maps every id to its piece (special tokens to their literal text, <unk>/<s>/</s> and ids past
  the vocabulary to nothing) and decodes the whole piece list in one SentencePiece call.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import sentencepiece as spm

from glm3.io import atomic_write_bytes, atomic_write_text

SPECIAL_TOKENS = (
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "sop",
    "eop",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)
ROLES = ("system", "user", "assistant", "observation")
VOCAB_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"


class TokenizerError(ValueError):
    pass


class ChatGLM3Tokenizer:
    """Tokenizer of ChatGLM3 over a SentencePiece model file (`tokenizer.model`)."""

    def __init__(self, vocab_file: str | os.PathLike):
        vocab_file = os.fspath(vocab_file)
        if not os.path.isfile(vocab_file):
            raise TokenizerError(f"tokenizer model not found: {vocab_file}")
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(vocab_file)
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"{vocab_file} is not a SentencePiece model: {exc}") from exc
        self.n_words = self.sp.vocab_size()
        self.special_tokens = {tok: self.n_words + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.index_special_tokens = {i: tok for tok, i in self.special_tokens.items()}
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.pad_id = self.unk_id  # ChatGLM3 pads with <unk> (id 0)
        # encode(allow_special=True) recognises the role tokens only, as the released tokenizer's
        # encode_special_tokens does: "[gMASK]", "sop" or "eop" inside text ("people", "isopropyl") stay text.
        self._role_re = re.compile("(" + "|".join(re.escape(f"<|{role}|>") for role in ROLES) + ")")

    # ------------------------------------------------------------------------------------ basics
    @property
    def vocab_size(self) -> int:
        """SentencePiece pieces plus the special tokens."""
        return self.n_words + len(SPECIAL_TOKENS)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def eos_token_id(self) -> int:
        return self.eos_id

    @property
    def pad_token_id(self) -> int:
        return self.pad_id

    def get_command(self, name: str) -> int:
        """Id of a special token ("[gMASK]", "sop", "<|user|>", ...)."""
        if name not in self.special_tokens:
            raise TokenizerError(f"{name!r} is not a special token; known: {', '.join(SPECIAL_TOKENS)}")
        return self.special_tokens[name]

    @property
    def stop_token_ids(self) -> tuple[int, int, int]:
        """Generation hands the turn back at eos, <|user|> or <|observation|>."""
        return self.eos_id, self.get_command("<|user|>"), self.get_command("<|observation|>")

    def tokenize(self, text: str) -> list[str]:
        """SentencePiece pieces of text (special-token text stays plain text)."""
        return self.sp.EncodeAsPieces(text)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Plain SentencePiece ids of text. With allow_special=True, the role tokens (<|system|>, <|user|>,
        <|assistant|>, <|observation|>) written in the text become their ids; everything else stays text."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        if not allow_special:
            return self.sp.EncodeAsIds(text)
        ids: list[int] = []
        for part in self._role_re.split(text):
            if part in self.special_tokens:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.sp.EncodeAsIds(part))
        return ids

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        if isinstance(tokens, str):
            if tokens in self.special_tokens:
                return self.special_tokens[tokens]
            return self.sp.PieceToId(tokens)
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        if isinstance(ids, (int, np.integer)):
            return self._id_to_piece(int(ids))
        return [self._id_to_piece(int(i)) for i in ids]

    def _id_to_piece(self, index: int) -> str:
        if index in self.index_special_tokens:
            return self.index_special_tokens[index]
        if index in (self.eos_id, self.bos_id, self.pad_id) or index < 0 or index >= self.n_words:
            return ""
        return self.sp.IdToPiece(index)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids, decoded as the released tokenizer does (one SentencePiece call over all pieces)."""
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        return self.sp.DecodePieces([self._id_to_piece(int(i)) for i in ids])

    # ------------------------------------------------------------------------------------- chat
    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        if role not in ROLES:
            raise TokenizerError(f"role must be one of {ROLES}, got {role!r}")
        return [self.get_command(f"<|{role}|>")] + self.encode(f"{metadata}\n") + self.encode(message)

    def build_chat_input(
        self, query: str, history: list[dict[str, Any]] | None = None, role: str = "user"
    ) -> dict[str, list[list[int]]]:
        """{"input_ids": [[...]], "attention_mask": [[1, ...]]} for one chat turn awaiting the assistant."""
        ids = [self.get_command("[gMASK]"), self.get_command("sop")]
        for item in history or []:
            if not isinstance(item, dict) or "role" not in item or "content" not in item:
                raise TokenizerError(f"history items need 'role' and 'content', got {item!r}")
            content = item["content"]
            if not isinstance(content, str):
                # An assistant tool call stored as a dict is replayed as its JSON text.
                content = json.dumps(content, ensure_ascii=False)
            if item["role"] == "system" and "tools" in item:
                content = content + "\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)
            ids.extend(self.build_single_message(item["role"], item.get("metadata", ""), content))
        ids.extend(self.build_single_message(role, "", query))
        ids.append(self.get_command("<|assistant|>"))
        return {"input_ids": [ids], "attention_mask": [[1] * len(ids)]}

    # ---------------------------------------------------------------------------------- batching
    def pad(self, sequences: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """Left-pad id lists to one length: {"input_ids": int64 [b, n], "attention_mask": int64 [b, n]}."""
        if not sequences:
            raise TokenizerError("nothing to pad: empty batch")
        width = max(len(s) for s in sequences)
        ids = np.full((len(sequences), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(sequences), width), dtype=np.int64)
        for row, seq in enumerate(sequences):
            if len(seq):
                ids[row, width - len(seq) :] = seq
                mask[row, width - len(seq) :] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def batch_encode(self, texts: Sequence[str], add_prefix: bool = True) -> dict[str, np.ndarray]:
        """Encode texts (each prefixed with [gMASK] sop unless add_prefix=False) into a left-padded batch."""
        prefix = [self.get_command("[gMASK]"), self.get_command("sop")] if add_prefix else []
        return self.pad([prefix + self.encode(t) for t in texts])

    def __call__(self, texts: str | Sequence[str], add_prefix: bool = True) -> dict[str, np.ndarray]:
        return self.batch_encode([texts] if isinstance(texts, str) else texts, add_prefix)

    # ---------------------------------------------------------------------------------- save/load
    def fingerprint(self) -> str:
        """sha256 of the SentencePiece model: identifies the vocabulary (for data caches)."""
        with open(self.vocab_file, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        """Write tokenizer.model and tokenizer_config.json (the release's file names) atomically."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        model_path = os.path.join(directory, VOCAB_FILE)
        if os.path.abspath(model_path) != os.path.abspath(self.vocab_file):
            with open(self.vocab_file, "rb") as f:
                atomic_write_bytes(model_path, f.read())
        config = {
            "tokenizer_class": "ChatGLMTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
            "padding_side": "left",
            "remove_space": False,
            "do_lower_case": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1000000000000000019884624838656,
            "added_tokens_decoder": {},
        }
        config_path = os.path.join(directory, CONFIG_FILE)
        atomic_write_text(config_path, json.dumps(config, indent=2) + "\n")
        return [model_path, config_path]

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ChatGLM3Tokenizer:
        path = os.fspath(directory)
        if os.path.isdir(path):
            path = os.path.join(path, VOCAB_FILE)
        return cls(path)


def load_tokenizer(path: str | os.PathLike) -> ChatGLM3Tokenizer:
    """The tokenizer of a model directory (its tokenizer.model), or of a tokenizer.model file."""
    return ChatGLM3Tokenizer.from_pretrained(path)


def train_sentencepiece(
    text_files: Sequence[str | os.PathLike],
    output_file: str | os.PathLike,
    vocab_size: int = 1500,
    seed_sentences: int = 1_000_000,
) -> str:
    """Train a BPE SentencePiece model with byte fallback, in ChatGLM3's settings, from text files.

    Whitespace and newlines are kept (identity normalisation, no whitespace folding), digits are split
    and ids 0/1/2 are <unk>/<s>/</s>, as in the released tokenizer. vocab_size is an upper bound: a small
    corpus yields fewer pieces. Writes output_file atomically and returns its path.

    The text is fed line by line rather than by file name: SentencePiece records its `input` files in the
    model, so the same text in another checkout would give another tokenizer.model (and a new DVC hash).
    """
    files = [os.fspath(f) for f in text_files]
    for f in files:
        if not os.path.isfile(f):
            raise TokenizerError(f"training text not found: {f}")
    import io

    def lines():
        for name in files:
            with open(name, encoding="utf-8") as f:
                for line in f:
                    yield line.rstrip("\n")

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=lines(),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            character_coverage=0.9995,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            hard_vocab_limit=False,
            input_sentence_size=seed_sentences,
            shuffle_input_sentence=False,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise TokenizerError(f"SentencePiece training failed (vocab_size={vocab_size}): {exc}") from exc
    output_file = os.fspath(output_file)
    atomic_write_bytes(output_file, model.getvalue())
    return output_file


def copy_tokenizer_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    """Copy a model directory's tokenizer files (tokenizer.model, tokenizer_config.json) if present."""
    copied = []
    for name in (VOCAB_FILE, CONFIG_FILE):
        src = os.path.join(os.fspath(src_dir), name)
        if os.path.isfile(src):
            dst = os.path.join(os.fspath(dst_dir), name)
            shutil.copyfile(src, dst)
            copied.append(dst)
    return copied
