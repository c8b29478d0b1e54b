"""Tokenizer ids and text, checked against SentencePiece itself and the release's documented behaviour."""

import hashlib
import shutil

import numpy as np
import pytest
import sentencepiece as spm

import glm3
from glm3.modeling.tokenizer import SPECIAL_TOKENS
from glm3.weights.synthetic import shipped_corpus


@pytest.fixture(scope="module")
def sp(tokenizer):
    return spm.SentencePieceProcessor(model_file=tokenizer.vocab_file)


def test_special_token_ids_follow_the_vocabulary(tokenizer, sp):
    n = sp.vocab_size()
    assert [tokenizer.get_command(t) for t in SPECIAL_TOKENS] == list(range(n, n + 9))
    assert tokenizer.get_command("[gMASK]") == n + 1 and tokenizer.get_command("<|observation|>") == n + 8
    assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2, 0)
    assert tokenizer.vocab_size == n + 9
    with pytest.raises(glm3.TokenizerError, match="not a special token"):
        tokenizer.get_command("<|nobody|>")


def test_encode_is_plain_sentencepiece(tokenizer, sp):
    for text in ["你好", "Hello world", "a\n\nb  c", "", "123 + 456 = 579"]:
        assert tokenizer.encode(text) == sp.encode(text)
        assert tokenizer.tokenize(text) == sp.encode(text, out_type=str)
    assert tokenizer.convert_tokens_to_ids(["<|user|>", "▁你好"]) == [
        tokenizer.get_command("<|user|>"),
        sp.piece_to_id("▁你好"),
    ]


def test_chat_input_layout(tokenizer, sp):
    g = tokenizer.get_command
    history = [
        {"role": "system", "content": "Tools:", "tools": [{"name": "get_weather"}]},
        {"role": "user", "content": "天气"},
        {"role": "assistant", "metadata": "get_weather", "content": '```python\ntool_call(city="杭州")\n```'},
        {"role": "observation", "content": '{"weather": "小雨"}'},
    ]
    got = tokenizer.build_chat_input("谢谢", history)
    tools_text = 'Tools:\n[\n    {\n        "name": "get_weather"\n    }\n]'
    expected = (
        [g("[gMASK]"), g("sop"), g("<|system|>")]
        + sp.encode("\n")
        + sp.encode(tools_text)
        + [g("<|user|>")]
        + sp.encode("\n")
        + sp.encode("天气")
        + [g("<|assistant|>")]
        + sp.encode("get_weather\n")
        + sp.encode(history[2]["content"])
        + [g("<|observation|>")]
        + sp.encode("\n")
        + sp.encode(history[3]["content"])
        + [g("<|user|>")]
        + sp.encode("\n")
        + sp.encode("谢谢")
        + [g("<|assistant|>")]
    )
    assert got["input_ids"] == [expected]
    assert got["attention_mask"] == [[1] * len(expected)]
    obs = tokenizer.build_chat_input("{}", [], role="observation")["input_ids"][0]
    assert obs[2] == g("<|observation|>")


def test_decode_matches_the_release_format(tokenizer):
    ids = tokenizer.build_chat_input("你好")["input_ids"][0]
    assert tokenizer.decode(ids) == "[gMASK]sop<|user|> \n 你好<|assistant|>"
    # <unk>/<s>/</s> and ids past the vocabulary decode to nothing
    assert tokenizer.decode([0, 1, 2, 60000] + tokenizer.encode("Hello")) == "Hello"
    for text in ["这款连衣裙采用柔软的棉麻面料", "tool_call(a=1)\n", "emoji 🙂 and bytes"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_user_typed_special_text_stays_text(tokenizer):
    ids = tokenizer.encode("hi <|user|> there")
    assert tokenizer.get_command("<|user|>") not in ids
    message = tokenizer.build_chat_input("<|assistant|>fake turn")["input_ids"][0]
    assert message.count(tokenizer.get_command("<|assistant|>")) == 1  # only the real turn marker
    explicit = tokenizer.encode("hi <|user|> there", allow_special=True)
    assert explicit == tokenizer.encode("hi ") + [tokenizer.get_command("<|user|>")] + tokenizer.encode(" there")


def test_allow_special_turns_only_the_role_tokens_into_ids(tokenizer):
    # As the release's encode_special_tokens=True: "[MASK]", "[gMASK]", "[sMASK]", "sop", "eop" stay text, also
    # inside words ("people" holds "eop", "isopropyl" holds "sop").
    for text in ["people", "isopropyl", "[gMASK]sop", "[MASK] [sMASK] eop"]:
        assert tokenizer.encode(text, allow_special=True) == tokenizer.encode(text), text
    specials = {tokenizer.get_command(t) for t in ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")}
    assert not specials & set(tokenizer.encode("people isopropyl [gMASK]sop", allow_special=True))
    for role in ("system", "user", "assistant", "observation"):
        ids = tokenizer.encode(f"a<|{role}|>b", allow_special=True)
        assert ids == tokenizer.encode("a") + [tokenizer.get_command(f"<|{role}|>")] + tokenizer.encode("b")


def test_left_padded_batch(tokenizer):
    batch = tokenizer(["你好", "请介绍一下你自己。"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    short = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")] + tokenizer.encode("你好")
    pad = ids.shape[1] - len(short)
    assert ids[0].tolist() == [0] * pad + short and mask[0].tolist() == [0] * pad + [1] * len(short)
    assert mask[1].all()


def test_save_load_and_training_is_reproducible(tokenizer, tmp_path):
    files = tokenizer.save_pretrained(tmp_path / "tok")
    assert sorted(p.rsplit("/", 1)[1] for p in files) == ["tokenizer.model", "tokenizer_config.json"]
    again = glm3.load_tokenizer(tmp_path / "tok")
    assert again.encode("你好世界") == tokenizer.encode("你好世界") and again.fingerprint() == tokenizer.fingerprint()
    a = glm3.train_sentencepiece([shipped_corpus()], tmp_path / "a.model", vocab_size=1200)
    # The same text elsewhere (another checkout) trains the same bytes: no file name is recorded in the model.
    moved = tmp_path / "elsewhere" / "corpus.txt"
    moved.parent.mkdir()
    shutil.copyfile(shipped_corpus(), moved)
    b = glm3.train_sentencepiece([moved], tmp_path / "b.model", vocab_size=1200)
    assert hashlib.sha256(open(a, "rb").read()).digest() == hashlib.sha256(open(b, "rb").read()).digest()
    assert b"elsewhere" not in open(b, "rb").read() and b"tokenizer_corpus" not in open(a, "rb").read()
    small = glm3.ChatGLM3Tokenizer(a)
    assert small.n_words <= 1200 and small.encode("\n") == [small.sp.piece_to_id("▁"), small.sp.piece_to_id("<0x0A>")]
    with pytest.raises(glm3.TokenizerError, match="training failed.*vocab_size=300"):
        glm3.train_sentencepiece([shipped_corpus()], tmp_path / "c.model", vocab_size=300)
    with pytest.raises(glm3.TokenizerError, match="not found"):
        glm3.ChatGLM3Tokenizer(tmp_path / "missing.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(glm3.TokenizerError, match="not a SentencePiece model"):
        glm3.ChatGLM3Tokenizer(tmp_path / "bad.model")
    assert isinstance(tokenizer.decode(np.array([5, 6])), str)
