"""llmcourse.widgets (Day 27): the knobs' distribution, the sampler behind the sliders, the widget's wiring,
and the static HTML sampler's content (its JavaScript runs in tests/test_static_sampler_browser.py)."""

from __future__ import annotations

import html
import json
import re

import pytest
import torch

from llmcourse.chartok import CharTokenizer
from llmcourse.checkpoint import load_pretrained
from llmcourse.generate import generate
from llmcourse.gpt import GPT, GPTConfig
from llmcourse.sampling import filter_logits
from llmcourse.widgets import (
    InteractiveSampler,
    Sample,
    _json_for_script,
    bars_html,
    next_token_distribution,
    sampling_widget,
    static_sampler_html,
    token_label,
    vocabulary_labels,
)


@pytest.fixture(scope="module")
def pretrained():
    model, tokenizer, _ = load_pretrained("shakespeare-char")
    return model, tokenizer


def page_data(page: str) -> tuple[str, dict]:
    """The element id and the embedded JSON of a static sampler page."""
    match = re.search(r'<script type="application/json" id="([\w-]+)-data">(.*?)</script>', page, re.DOTALL)
    assert match, "the page embeds no data"
    return match.group(1), json.loads(match.group(2))


# --------------------------------------------------------------------------------------------------
# next_token_distribution


@pytest.mark.parametrize("settings", [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.8), (0.5, 10, 0.9), (2.0, 0, 0.3)])
def test_distribution_is_the_softmax_of_filter_logits(settings):
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0)) * 2
    probs = next_token_distribution(logits, *settings)
    assert probs.shape == (3, 40)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    torch.testing.assert_close(probs, torch.softmax(filter_logits(logits, *settings), dim=-1))


def test_top_k_keeps_k_tokens_and_every_tie():
    logits = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0, 2.0])
    assert int((next_token_distribution(logits, 1.0, top_k=2) > 0).sum()) == 4  # 3.0 and the three tied 2.0s
    assert int((next_token_distribution(logits, 1.0, top_k=1) > 0).sum()) == 1


def test_temperature_zero_is_all_mass_on_the_first_most_likely_token():
    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0], [4.0, 0.0, 0.0, 4.0]])
    expected = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert torch.equal(next_token_distribution(logits, 0), expected)
    assert torch.equal(next_token_distribution(logits, 0, top_k=2, top_p=0.5), expected)  # greedy ignores the rest


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(temperature=0, top_p=1.5)])
def test_distribution_refuses_bad_knobs(bad):
    with pytest.raises((ValueError, TypeError)):
        next_token_distribution(torch.zeros(5), **{"temperature": 1.0, **bad})


# --------------------------------------------------------------------------------------------------
# Labels and bars


def test_token_labels_make_invisible_characters_visible():
    assert [token_label(t) for t in ("a", " to", "\n", "\t", "\x07", "")] == ["a", "␣to", "↵", "⇥", "\\x07", "∅"]
    with pytest.raises(TypeError):
        token_label(7)


def test_vocabulary_labels(pretrained):
    _, tokenizer = pretrained
    labels = vocabulary_labels(tokenizer)
    assert len(labels) == tokenizer.vocab_size and labels[0] == "↵" and labels[1] == "␣"
    assert all(label.isprintable() for label in labels)


def test_bars_html_shows_the_n_most_likely_and_escapes_labels():
    probs = torch.tensor([0.1, 0.6, 0.0, 0.3])
    chart = bars_html(probs, ["a", "<b>", "c", "&"], n=3)
    assert chart.count("monospace") == 3 and "3 of 4 tokens can be drawn" in chart
    assert "&lt;b&gt;" in chart and "<b>" not in chart and "&amp;" in chart
    assert chart.index("&lt;b&gt;") < chart.index("&amp;") < chart.index(">a<")  # most likely first
    assert "width:60.0%" in chart and ">c<" not in chart  # only 3 rows
    with pytest.raises(ValueError):
        bars_html(probs, ["a", "b"])


# --------------------------------------------------------------------------------------------------
# InteractiveSampler


def test_update_at_temperature_zero_is_greedy_decoding(pretrained):
    model, tokenizer = pretrained
    sampler = InteractiveSampler(model, tokenizer, "JULIET:\n", temperature=0, length=40, top_k=3, seed=5)
    sample = sampler.update()
    ids = torch.tensor([tokenizer.encode("JULIET:\n")])
    assert isinstance(sample, Sample) and sample.message == ""
    assert sample.text == tokenizer.decode(generate(model, ids, 40, temperature=0)[0].tolist())
    assert torch.equal(sample.probs, next_token_distribution(model(ids)[0][0, -1].detach(), 0))


def test_update_samples_from_its_seed(pretrained):
    model, tokenizer = pretrained
    sampler = InteractiveSampler(model, tokenizer, "ROMEO:\n", temperature=1.0, length=60, seed=0)
    first = sampler.update().text
    assert sampler.update().text == first  # a fresh generator each time: one setting, one text
    sampler.seed = 1
    assert sampler.update().text != first
    sampler.seed = 0
    ids = torch.tensor([tokenizer.encode("ROMEO:\n")])
    expected = generate(model, ids, 60, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert first == tokenizer.decode(expected[0].tolist()) and first.startswith("ROMEO:\n") and len(first) == 67


def test_update_probabilities_follow_the_knobs(pretrained):
    model, tokenizer = pretrained
    sampler = InteractiveSampler(model, tokenizer, "ROMEO:\n", length=1)
    logits = sampler.next_token_logits(tokenizer.encode("ROMEO:\n"))
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.8, 4, 1.0), (1.2, 0, 0.6), (1.5, 10, 0.9)]:
        sampler.temperature, sampler.top_k, sampler.top_p = temperature, top_k, top_p
        probs = sampler.update().probs
        assert probs.shape == (tokenizer.vocab_size,)
        torch.testing.assert_close(probs.sum(), torch.tensor(1.0))
        if top_k:
            assert int((probs > 0).sum()) <= top_k
        torch.testing.assert_close(probs, next_token_distribution(logits, temperature, top_k or None, None if top_p == 1 else top_p))


def test_a_prompt_the_model_cannot_read_is_a_one_line_message(pretrained):
    model, tokenizer = pretrained
    sampler = InteractiveSampler(model, tokenizer, "Café «ROMEO»", length=5)
    sample = sampler.update()
    assert sample.text == "" and sample.probs is None
    assert "'é', '«', '»'" in sample.message and "\n" not in sample.message
    sampler.prompt = ""
    assert "at least one character" in sampler.update().message
    sampler.prompt = "ROMEO:\n"
    assert sampler.update().message == ""


def test_a_tokenizer_without_stoi_reports_its_own_error(pretrained):
    model, tokenizer = pretrained

    class Strict:  # a tokenizer that knows only what it knows, and says so in several lines
        vocab_size = tokenizer.vocab_size
        decode = staticmethod(tokenizer.decode)

        @staticmethod
        def encode(text):
            if "#" in text:
                raise ValueError("no '#' here\nsecond line")
            return tokenizer.encode(text)

    sample = InteractiveSampler(model, Strict(), "a#b", length=3).update()
    assert sample.message == "The prompt cannot be encoded: no '#' here"


def test_sampler_checks_its_model_and_tokenizer(pretrained):
    model, tokenizer = pretrained
    with pytest.raises(TypeError):
        InteractiveSampler(torch.nn.Linear(2, 2), tokenizer)
    with pytest.raises(ValueError):
        InteractiveSampler(model, CharTokenizer("abc"))
    sampler = InteractiveSampler(model, tokenizer, length=3, top_p=0.0)
    with pytest.raises(ValueError):
        sampler.update()


def test_the_sampler_leaves_the_model_in_its_mode(pretrained):
    model, tokenizer = pretrained
    model.train()
    try:
        InteractiveSampler(model, tokenizer, length=3).update()
        assert model.training
    finally:
        model.eval()


# --------------------------------------------------------------------------------------------------
# The widget (ipywidgets work without a front end: setting a value runs the observers)


def test_widget_controls_drive_the_sampler(pretrained):
    pytest.importorskip("ipywidgets")
    model, tokenizer = pretrained
    widget = sampling_widget(model, tokenizer, "ROMEO:\n", length=30)
    assert set(widget.controls) == {"prompt", "temperature", "top_k", "top_p", "seed", "length"}
    assert widget.controls["top_k"].max == tokenizer.vocab_size and widget.controls["temperature"].min == 0
    message, (text, bars) = widget.children[1], widget.children[2].children
    assert "75 of 75 tokens can be drawn" in bars.value and "<b>ROMEO:\n</b>" in text.value

    widget.controls["temperature"].value = 0
    greedy = tokenizer.decode(generate(model, torch.tensor([tokenizer.encode("ROMEO:\n")]), 30, temperature=0)[0].tolist())
    assert html.unescape(text.value).endswith(greedy[len("ROMEO:\n"):] + "</pre>")
    assert widget.sampler.temperature == 0 and "1 of 75 tokens can be drawn" in bars.value

    widget.controls["temperature"].value = 1.0
    widget.controls["top_k"].value = 3
    assert "3 of 75 tokens can be drawn" in bars.value
    sampled = text.value
    widget.controls["seed"].value = 7
    assert text.value != sampled

    widget.controls["prompt"].value = "naïve"
    assert "'ï'" in html.unescape(message.value) and text.value != "" and "naïve" not in text.value  # the last text stays
    widget.controls["prompt"].value = "KING:\n"
    assert message.value == "" and "<b>KING:\n</b>" in text.value
    widget.controls["length"].value = 10
    assert len(html.unescape(re.sub(r"<[^>]+>", "", text.value))) == len("KING:\n") + 10


# --------------------------------------------------------------------------------------------------
# The static sampler's HTML


@pytest.fixture(scope="module")
def small_page(pretrained):
    model, tokenizer = pretrained
    settings = dict(temperatures=(0.0, 0.8, 1.5), top_ks=(0, 3), top_ps=(0.6, 1.0), max_new_tokens=30, seed=3)
    return static_sampler_html(model, tokenizer, "ROMEO:\n", **settings), settings


def test_page_embeds_the_logits_labels_and_grid(pretrained, small_page):
    model, tokenizer = pretrained
    page, settings = small_page
    prefix, data = page_data(page)
    ids = torch.tensor([tokenizer.encode("ROMEO:\n")])
    with torch.inference_mode():
        logits = model(ids)[0][0, -1]
    torch.testing.assert_close(torch.tensor(data["logits"]), logits, atol=1e-4, rtol=0)
    assert data["labels"] == vocabulary_labels(tokenizer) and data["seed"] == 3 and data["n_bars"] == 20
    assert data["temperatures"] == [0.0, 0.8, 1.5] and data["top_ks"] == [0, 3] and data["top_ps"] == [0.6, 1.0]
    grid = torch.tensor(data["grid"])
    assert grid.shape == (3, 2, 2) and len(set(grid[0].flatten().tolist())) == 1  # greedy written once
    assert len(set(data["texts"])) == len(data["texts"]) <= 1 + 2 * 2 * 2
    for i, t in enumerate(settings["temperatures"]):
        for j, k in enumerate(settings["top_ks"]):
            for l, p in enumerate(settings["top_ps"]):
                out = generate(model, ids, 30, temperature=t, top_k=k or None, top_p=None if p == 1 else p,
                               generator=torch.Generator().manual_seed(3))
                assert data["texts"][data["grid"][i][j][l]] == tokenizer.decode(out[0, ids.size(1):].tolist()), (t, k, p)


def test_page_is_self_contained_with_prefixed_ids(small_page):
    page, _ = small_page
    prefix, _ = page_data(page)
    assert page.startswith(f'<div id="{prefix}" class="llmc-sampler">') and page.endswith("</div>")
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids)) and all(i == prefix or i.startswith(prefix + "-") for i in ids)
    for name in ("temperature", "top_k", "top_p"):
        assert f'<input type="range" id="{prefix}-{name}"' in page
    assert "http" not in page and "src=" not in page and "import " not in page  # no network, no library
    assert page.count("<script") == 2 and "window.llmcourseSampling" in page and "__PREFIX__" not in page
    assert len(page) < 20_000


def test_default_grid_fits_the_budget(pretrained):
    model, tokenizer = pretrained
    page = static_sampler_html(model, tokenizer, max_new_tokens=40, element_id="day27")
    prefix, data = page_data(page)
    assert prefix == "day27" and torch.tensor(data["grid"]).shape == (5, 3, 3)
    assert len(page) < 30_000  # 120 characters a text (the default) stays under 60 KB


def test_element_ids_differ_between_pages(pretrained, small_page):
    model, tokenizer = pretrained
    other = static_sampler_html(model, tokenizer, "JULIET:\n", temperatures=(0.0,), top_ks=(0,), top_ps=(1.0,), max_new_tokens=5)
    assert page_data(other)[0] != page_data(small_page[0])[0]


def test_embedded_json_cannot_end_its_script_element():
    text = _json_for_script({"text": "</script><script>alert(1)</script> & more"})
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == {"text": "</script><script>alert(1)</script> & more"}


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperatures=(0.5, 2.5)),
        dict(temperatures=(-1.0,)),
        dict(top_ks=(-1,)),
        dict(top_ps=(0.0,)),
        dict(top_ps=(0.01,)),
        dict(temperatures=()),
        dict(max_new_tokens=-1),
        dict(element_id="1st"),
        dict(element_id='x" onclick="y'),
        dict(prompt="Café"),
    ],
)
def test_static_sampler_refuses_bad_arguments(pretrained, bad):
    model, tokenizer = pretrained
    with pytest.raises((ValueError, TypeError)):
        static_sampler_html(model, tokenizer, **{"max_new_tokens": 2, **bad})


def test_static_sampler_refuses_a_vocabulary_too_large_to_embed():
    model = GPT(GPTConfig(vocab_size=2000, block_size=8, n_layer=1, n_head=1, n_embd=8))

    class Wide:
        vocab_size = 2000

    with pytest.raises(ValueError, match="too many"):
        static_sampler_html(model, Wide(), "a")
