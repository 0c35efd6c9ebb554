"""A Hugging Face byte-level BPE tokenizer as GGUF `tokenizer.ggml.*` metadata, the way llama.cpp's
`convert_hf_to_gguf.py` writes it (`get_vocab_base` + `gguf.SpecialVocab`): tokens by id, their types
(special added tokens CONTROL, other added ones USER_DEFINED, missing ids UNUSED "[PADi]"), merges,
bos / eos / unk / pad ids, whether to add bos / eos, the chat template, and the pre-tokenizer name
llama.cpp picks its regex by, identified like the converter does: the hash of the ids of a fixed text."""

from __future__ import annotations

import hashlib
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

from optpass.errors import ExportError

# llama.cpp's check text and the hashes of its tokenization -> pre-tokenizer name (convert_hf_to_gguf.py's
# get_vocab_base_pre; a few of the byte-level BPE families that run on the llama architecture)
CHECK_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
              '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
              '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
              '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
}
NORMAL, UNUSED, CONTROL, USER_DEFINED = 1, 5, 3, 4  # gguf.TokenType


def pre_tokenizer(tokenizer: Any) -> str:
    """llama.cpp's pre-tokenizer name for `tokenizer`; an unknown one falls back to "default" with a warning
    (llama.cpp then splits text with its generic regex, which can tokenize some text differently)."""
    digest = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    name = PRE_TOKENIZERS.get(digest)
    if name is None:
        warnings.warn(f"gguf export: pre-tokenizer not recognised (check hash {digest[:12]}...); writing 'default'",
                      stacklevel=3)
        return "default"
    return name


def _is_special_looking(token: str) -> bool:
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


def vocab_entries(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and GGUF token types for ids 0..vocab_size-1 (convert_hf_to_gguf's `get_vocab_base`)."""
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"gguf export: the tokenizer has ids up to {max(vocab.values())}, the model's vocabulary "
                          f"is {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _is_special_looking(token):
                types.append(CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(token)
    return tokens, types


def _adds(tokenizer: Any, token_id: int | None, first: bool) -> bool:
    """Whether encoding a plain text puts `token_id` at its start (first) / end: what add_bos / add_eos mean."""
    if token_id is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and (ids[0] if first else ids[-1]) == token_id


def add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """Write `tokenizer`'s GGUF metadata; None writes the "none" vocabulary (llama.cpp then takes token ids only)."""
    import gguf

    if tokenizer is None:
        writer.add_tokenizer_model("none")
        return
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        spec = Path(tmp) / "tokenizer.json"
        model = json.loads(spec.read_text()).get("model", {}) if spec.exists() else {}
        if model.get("type") != "BPE" or model.get("byte_fallback"):
            raise ExportError("gguf export: only byte-level BPE tokenizers (tokenizer.json, GPT-2 style) are "
                              f"written; this one is {model.get('type', 'not a tokenizers BPE')}"
                              f"{' with byte fallback (sentencepiece-style)' if model.get('byte_fallback') else ''}")
        tokens, types = vocab_entries(tokenizer, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
        special.add_special_token["bos"] = _adds(tokenizer, tokenizer.bos_token_id, first=True)
        special.add_special_token["eos"] = _adds(tokenizer, tokenizer.eos_token_id, first=False)
        if special.chat_template is None and getattr(tokenizer, "chat_template", None):
            special.chat_template = tokenizer.chat_template
        special.add_to_gguf(writer)
