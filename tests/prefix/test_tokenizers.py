"""extproc.prefix.tokenizers: the three implementations and the factory."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc.prefix.tokenizers import (
    ByteEstimateTokenizer,
    HFTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    load_tokenizer,
    render_chat,
)

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}],
    },
]


def test_cl100k_is_the_real_vocabulary() -> None:
    tok = load_tokenizer("cl100k_base")
    assert isinstance(tok, Tokenizer)
    # Known cl100k_base ids (tiktoken's documented example).
    assert tok.encode("hello world") == [15339, 1917]
    assert tok.decode([15339, 1917]) == "hello world"


def test_special_token_text_is_ordinary_text() -> None:
    tok = TiktokenTokenizer.cl100k()
    assert 100257 not in tok.encode("<|endoftext|>")


def test_tiktoken_file_loader_matches_bundled() -> None:
    import tiktoken_ext

    path = Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken"
    from_file = load_tokenizer(f"tiktoken:{path}")
    text = "The quick brown fox, 1234 times!\n\n  indented"
    assert from_file.encode(text) == TiktokenTokenizer.cl100k().encode(text)


def test_chat_template_layout() -> None:
    text = render_chat(MESSAGES)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert not render_chat(MESSAGES, add_generation_prompt=False).endswith("\n\n")
    with pytest.raises(ValueError, match="role"):
        render_chat([{"content": "x"}])


def _write_word_level_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer as HF
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "<|eot_id|>": 3}
    hf = HF(WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = Whitespace()
    file = path / "tokenizer.json"
    hf.save(str(file))
    return file


def test_hf_tokenizer_json(tmp_path: Path) -> None:
    file = _write_word_level_tokenizer(tmp_path)
    for spec in (str(file), f"hf:{file}", str(tmp_path)):
        tok = load_tokenizer(spec)
        assert isinstance(tok, HFTokenizer)
        assert tok.encode("hello world bogus") == [1, 2, 0]
    assert HFTokenizer.from_file(file).decode([1, 2]) == "hello world"


@pytest.mark.parametrize(
    "text", ["", "abc", "héllo wörld — ünïcode ✓", "exactly8", "\x00leading zero"]
)
def test_byte_estimator_round_trip(text: str) -> None:
    tok = ByteEstimateTokenizer(4)
    ids = tok.encode(text)
    assert len(ids) == -(-len(text.encode()) // 4)
    assert tok.decode(ids) == text


def test_byte_estimator_chat_and_spec() -> None:
    tok = load_tokenizer("bytes:2")
    assert isinstance(tok, ByteEstimateTokenizer)
    assert tok.bytes_per_token == 2
    assert tok.decode(tok.apply_chat_template(MESSAGES)) == render_chat(MESSAGES)


def test_unknown_spec() -> None:
    with pytest.raises(ValueError, match="unknown tokenizer"):
        load_tokenizer("nonsense")
