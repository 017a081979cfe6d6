"""The engine's incremental detokenizer: characters split over byte tokens come out whole, stop strings
cut the text even when they span tokens, and text offsets point at each token's text."""
from moa.serve.detokenizer import Detokenizer, text_offsets
from moa.tiny import byte_tokenizer


def stream(text: str, stop=(), tokenizer=byte_tokenizer()):
    detok = Detokenizer(tokenizer, tuple(stop))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    deltas = []
    for i, token in enumerate(ids):
        delta, stopped = detok.add(token, final=i == len(ids) - 1)
        deltas.append(delta)
        if stopped:
            return deltas, True
    return deltas, False


def test_multibyte_characters_are_never_split():
    deltas, stopped = stream("Grüße, 日本")
    assert "".join(deltas) == "Grüße, 日本" and not stopped
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[-3:] == ["", "", "本"]  # three byte tokens, one character once the last arrives


def test_stop_strings_spanning_tokens_cut_the_text():
    deltas, stopped = stream("Hello world. Bye", stop=["d. B"])
    assert stopped and "".join(deltas) == "Hello worl"
    deltas, stopped = stream("abc", stop=["c", "zz"])
    assert stopped and "".join(deltas) == "ab"


def test_text_offsets_point_at_each_tokens_text():
    tokenizer = byte_tokenizer()
    ids = tokenizer("aé b", add_special_tokens=False)["input_ids"]
    text, offsets = text_offsets(tokenizer, ids)
    assert text == "aé b" and offsets == [0, 1, 1, 2, 3]  # é is two byte tokens, both at its character
