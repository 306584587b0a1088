"""Shared test material for the prefix tests: random texts and a small trained HF BPE."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from extproc.prefix.tokenizers import LLAMA3_CHAT_TEMPLATE

WORDS = (
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "cache", "block", "token",
    "prefix", "hash", "naïve", "café", "日本語", "x", "I'm", "don't", "it's", "42", "1234567",
    "foo_bar", "(a,", "b)", "->", "==", "{", "}", "#", "'", '"', "...", "!?", "émigré",
)  # fmt: skip
GAPS = (" ", " ", " ", " ", "\n", "\n\n", "  ", "\t", " \n", "\n  ", ". ", ", ", "\r\n", "")

SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def random_text(rng: random.Random, words: int) -> str:
    return "".join(rng.choice(WORDS) + rng.choice(GAPS) for _ in range(words))


def random_conversation(rng: random.Random, turns: int, words: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": random_text(rng, words)}]
    for i in range(turns):
        role = "user" if i % 2 == 0 else "assistant"
        messages.append({"role": role, "content": random_text(rng, rng.randint(1, words))})
    return messages


def train_hf_bpe(directory: Path, *, bos: bool = False, chat_template: bool = True) -> Path:
    """A byte-level BPE (GPT-2 / Llama 3 style pre-tokenizer) trained on random text, saved as
    tokenizer.json (+ tokenizer_config.json with the Llama 3 template) in `directory`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    rng = random.Random(7)
    tok.train_from_iterator([random_text(rng, 200) for _ in range(50)], trainer=trainer)
    if bos:
        bos_id = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|> $A $B",
            special_tokens=[("<|begin_of_text|>", bos_id)],
        )
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config: dict[str, Any] = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    if chat_template:
        config["chat_template"] = LLAMA3_CHAT_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory
