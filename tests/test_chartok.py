"""llmcourse.chartok (Day 7): CharTokenizer's vocabulary, round trip, unknown policies, errors, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmcourse.chartok import REPLACEMENT_CHARACTER, UNKNOWN_POLICIES, CharTokenizer
from llmcourse.data import load_corpus

# Any Unicode text except lone surrogates, which cannot be written as UTF-8 (and so not saved).
unicode_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)


def test_vocabulary_is_sorted_and_ids_follow_it():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == (" ", "d", "e", "h", "l", "o", "r", "w")
    assert tok.vocab_size == len(tok) == 8
    assert tok.encode("hello") == [3, 2, 4, 4, 5]
    assert tok.stoi == {c: i for i, c in enumerate(tok.chars)}


def test_the_corpus_round_trips_exactly():
    text = load_corpus()
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == 75
    ids = tok.encode(text)
    assert len(ids) == len(text) and max(ids) == 74 and min(ids) == 0
    assert tok.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(unicode_text)
def test_round_trip_on_any_unicode(text):
    if not text:
        with pytest.raises(ValueError, match="empty"):
            CharTokenizer.from_text(text)
        return
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert len(ids) == len(text) and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(unicode_text.filter(bool), unicode_text)
def test_policies_on_any_unicode(vocab_text, text):
    known = set(vocab_text)
    skip = CharTokenizer.from_text(vocab_text, unknown="skip")
    assert skip.decode(skip.encode(text)) == "".join(c for c in text if c in known)
    replace = CharTokenizer.from_text(vocab_text, unknown="replace")
    assert replace.decode(replace.encode(text)) == "".join(c if c in known else REPLACEMENT_CHARACTER for c in text)
    error = CharTokenizer.from_text(vocab_text)
    unknown = [i for i, c in enumerate(text) if c not in known]
    if unknown:
        with pytest.raises(ValueError, match=f"at position {unknown[0]} "):
            error.encode(text)
    else:
        assert error.decode(error.encode(text)) == text


def test_unknown_character_error_names_it_and_its_position():
    tok = CharTokenizer.from_text("abc ")
    with pytest.raises(ValueError) as info:
        tok.encode("ab\tc")
    message = str(info.value)
    assert "'\\t'" in message and "position 2" in message and "U+0009" in message
    assert "unknown='replace'" in message  # says how to get past it


def test_replace_reserves_a_character():
    tok = CharTokenizer.from_text("abc", unknown="replace")
    assert tok.chars == ("a", "b", "c", REPLACEMENT_CHARACTER) and tok.replacement == REPLACEMENT_CHARACTER
    assert tok.encode("abzc") == [0, 1, 3, 2]
    assert tok.decode(tok.encode("abzc")) == "ab\ufffdc"


def test_a_custom_replacement_character():
    tok = CharTokenizer.from_text("abc", unknown="replace", replacement="?")
    assert tok.chars == ("?", "a", "b", "c")
    assert tok.decode(tok.encode("a!c")) == "a?c"
    assert CharTokenizer("ab?", unknown="replace", replacement="?").encode("xa") == [2, 0]


def test_skip_drops_unknown_characters():
    tok = CharTokenizer.from_text("abc", unknown="skip")
    assert tok.vocab_size == 3 and tok.replacement is None
    assert tok.encode("xaybzc") == [0, 1, 2] and tok.encode("xyz") == []


@pytest.mark.parametrize(
    "chars, kwargs, match",
    [
        ("", {}, "empty"),
        (["a", "bc"], {}, "single character"),
        (["a", 1], {}, "single character"),
        ("aba", {}, "appears twice"),
        ("ab", {"unknown": "ignore"}, "unknown must be one of"),
        ("ab", {"unknown": "replace"}, "must be in the vocabulary"),
        ("ab", {"unknown": "replace", "replacement": "?"}, "must be in the vocabulary"),
        ("ab?", {"replacement": "?"}, "only applies with unknown='replace'"),
    ],
)
def test_constructor_errors(chars, kwargs, match):
    with pytest.raises(ValueError, match=match):
        CharTokenizer(chars, **kwargs)


def test_unknown_policies_are_the_documented_ones():
    assert UNKNOWN_POLICIES == ("error", "replace", "skip")


def test_encode_and_from_text_want_text():
    tok = CharTokenizer.from_text("ab")
    with pytest.raises(TypeError):
        tok.encode(b"ab")
    with pytest.raises(TypeError):
        tok.encode(["a", "b"])
    with pytest.raises(TypeError):
        CharTokenizer.from_text(["a", "b"])
    assert tok.encode("") == []


@pytest.mark.parametrize("bad", [3, -1, 100])
def test_decode_out_of_range_ids(bad):
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError) as info:
        tok.decode([0, 1, bad])
    message = str(info.value)
    assert f"token id {bad}" in message and "position 2" in message and "0 to 2" in message


def test_decode_accepts_tensors_arrays_and_numpy_integers():
    tok = CharTokenizer.from_text("abc")
    assert tok.decode(torch.tensor([2, 1, 0])) == "cba"
    assert tok.decode(np.array([2, 1, 0], dtype=np.uint16)) == "cba"
    assert tok.decode([np.int64(1), np.int64(2)]) == "bc"
    assert tok.decode((i for i in [0, 0])) == "aa"
    assert tok.decode([]) == "" and tok.decode(torch.tensor([], dtype=torch.long)) == ""
    with pytest.raises(ValueError, match="token id 5"):
        tok.decode([np.int64(1), np.int64(5)])  # numpy integers are integers, and still range-checked
    with pytest.raises(ValueError, match="token id -2"):
        tok.decode(torch.tensor([0, -2]))


@pytest.mark.parametrize("bad", [[0, 1.0], [0, "a"], [0, None], [[0, 1]], "ab", b"ab", 1])
def test_decode_rejects_non_integer_ids(bad):
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(TypeError):
        tok.decode(bad)


def test_save_and_load_round_trip(tmp_path):
    text = "Caf\u00e9 \u4e2d\u6587 \U0001f600\n\"quoted\" back\\slash"
    for tok in (
        CharTokenizer.from_text(text),
        CharTokenizer.from_text(text, unknown="replace"),
        CharTokenizer.from_text(text, unknown="replace", replacement="#"),
        CharTokenizer.from_text(text, unknown="skip"),
    ):
        path = tok.save(tmp_path / "tok.json")
        loaded = CharTokenizer.load(path)
        assert loaded == tok and loaded.chars == tok.chars
        assert (loaded.unknown, loaded.replacement) == (tok.unknown, tok.replacement)
        assert loaded.decode(loaded.encode(text)) == tok.decode(tok.encode(text))


def test_saved_file_is_utf8_json_with_stable_sorted_keys(tmp_path):
    tok = CharTokenizer.from_text("b\u00e9a")
    first = tok.save(tmp_path / "one.json").read_bytes()
    second = CharTokenizer.load(tmp_path / "one.json").save(tmp_path / "two.json").read_bytes()
    assert first == second  # the same tokenizer always gives the same bytes
    payload = json.loads(first.decode("utf-8"))
    assert list(payload) == sorted(payload)
    assert payload["chars"] == "ab\u00e9" and payload["unknown"] == "error" and payload["replacement"] is None
    assert "\u00e9".encode("utf-8") in first  # written as UTF-8, not as a \\u escape


@pytest.mark.parametrize(
    "content, match",
    [
        (b"not json", "not a CharTokenizer file"),
        (b"\xff\xfe", "not a CharTokenizer file"),
        (b"[1, 2]", "not a CharTokenizer file"),
        (b'{"format": "something else", "version": 1, "chars": "ab"}', "not a CharTokenizer file"),
        (b'{"format": "llmcourse.CharTokenizer", "version": 2, "chars": "ab"}', "version 2"),
        (b'{"format": "llmcourse.CharTokenizer", "version": 1, "chars": ["a", "b"]}', "must be a string"),
        (b'{"format": "llmcourse.CharTokenizer", "version": 1, "chars": "aa"}', "appears twice"),
    ],
)
def test_load_rejects_bad_files(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        CharTokenizer.load(path)


def test_load_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        CharTokenizer.load(tmp_path / "nope.json")


def test_equality_and_repr():
    a = CharTokenizer.from_text("abc")
    assert a == CharTokenizer("abc") and a != CharTokenizer("abc", unknown="skip") and a != "abc"
    assert repr(a) == "CharTokenizer(vocab_size=3, unknown='error')"
    assert repr(CharTokenizer.from_text("abc", unknown="replace")) == (
        "CharTokenizer(vocab_size=4, unknown='replace', replacement='\ufffd')"
    )
