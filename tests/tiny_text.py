"""A character-level tokenizer with a chat template, for tiny text models built in tests."""

import string

from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<unk>", "<|im_start|>", "<|im_end|>"]
CHARS = list(" " + string.ascii_lowercase + string.digits + ".,?!")
VOCAB_SIZE = len(SPECIAL) + len(CHARS)


def char_tokenizer():
    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
        unk_token="<unk>", bos_token="<|im_start|>", eos_token="<|im_end|>",
    )
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>{% endif %}"
    )
    return tok
