"""Day 27's static sampler in a real browser: headless Chromium driven by selenium.

The page's JavaScript re-implements ``llmcourse.widgets.next_token_distribution``; these tests run it and
compare, then move the page's sliders as a reader would, on a page written here and on the page of the
built book (when ``_build/html`` holds it: CI builds the book before it runs the tests). They skip, saying
why, where selenium, Chromium or chromedriver are missing (Debian: ``apt-get install chromium
chromium-driver``, which ``.ci/run`` does).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from llmcourse.checkpoint import load_pretrained
from llmcourse.widgets import next_token_distribution, static_sampler_html

ROOT = Path(__file__).resolve().parents[1]
BOOK_PAGE = ROOT / "_build" / "html" / "notebooks" / "day27_interactive_sampling.html"


def _find(names: tuple[str, ...], fallback: str) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return fallback if os.access(fallback, os.X_OK) else None


CHROMIUM = _find(("chromium", "chromium-browser"), "/usr/bin/chromium")
CHROMEDRIVER = _find(("chromedriver",), "/usr/bin/chromedriver")


def _why_no_browser() -> str:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (it is in the dev extra: pip install -e '.[dev]')"
    if CHROMIUM is None:
        return "no Chromium browser on this machine (Debian: apt-get install chromium; .ci/run installs it)"
    if CHROMEDRIVER is None:
        return "no chromedriver on this machine (Debian: apt-get install chromium-driver; .ci/run installs it)"
    return ""


pytestmark = pytest.mark.skipif(bool(_why_no_browser()), reason=_why_no_browser() or "browser present")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    options.page_load_strategy = "eager"  # inline scripts have run by DOMContentLoaded; never wait for a CDN
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def pretrained():
    model, tokenizer, _ = load_pretrained("shakespeare-char")
    return model, tokenizer


@pytest.fixture(scope="module")
def page_file(pretrained, tmp_path_factory):
    """A small sampler over the real model, written to a standalone HTML file."""
    model, tokenizer = pretrained
    snippet = static_sampler_html(model, tokenizer, "ROMEO:\n", temperatures=(0.0, 0.8, 1.5), top_ks=(0, 3),
                                  top_ps=(0.6, 1.0), max_new_tokens=40, seed=1, element_id="sampler")
    path = tmp_path_factory.mktemp("sampler") / "sampler.html"
    path.write_text(f'<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>{snippet}</body></html>', encoding="utf-8")
    return path


class SamplerPage:
    """The sampler with element id ``prefix`` in the browser's current page."""

    def __init__(self, driver, prefix: str):
        self.driver, self.prefix = driver, prefix
        self.data = json.loads(self.element("data").get_attribute("textContent"))

    def element(self, name: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.ID, f"{self.prefix}-{name}")

    def text(self) -> str:
        return self.element("text").get_attribute("textContent")

    def bars(self) -> dict[int, float]:
        """Token id -> the probability its bar shows."""
        pairs = self.driver.execute_script(
            "return Array.from(document.getElementById(arguments[0]).querySelectorAll('.llmc-bar'))"
            ".map(b => [b.getAttribute('data-token'), b.getAttribute('data-p')]);", self.prefix + "-bars")
        return {int(token): float(p) for token, p in pairs}

    def set_slider(self, name: str, value: float) -> None:
        """Set a range input and fire the ``input`` event a drag fires."""
        self.driver.execute_script(
            "const s = arguments[0]; s.value = arguments[1]; s.dispatchEvent(new Event('input', {bubbles: true}));",
            self.element(name), str(value))

    def press(self, name: str, *keys) -> None:
        """Focus a slider and press keys on it, as a reader using the keyboard does."""
        slider = self.element(name)
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].focus();", slider)
        slider.send_keys(*keys)

    def expected_bars(self, temperature: float, top_k: int, top_p: float) -> dict[int, float]:
        logits = torch.tensor(self.data["logits"], dtype=torch.float64)
        probs = next_token_distribution(logits, temperature, top_k or None, None if top_p >= 1 else top_p)
        return {token: probs[token].item() for token in self.bars()}

    def expected_text(self, temperature: float, top_k: int, top_p: float) -> str:
        d = self.data
        i, j, l = d["temperatures"].index(temperature), d["top_ks"].index(top_k), d["top_ps"].index(top_p)
        return d["texts"][d["grid"][i][j][l]]


def assert_bars(shown: dict[int, float], expected: dict[int, float]) -> None:
    assert shown.keys() == expected.keys()
    for token in shown:
        assert shown[token] == pytest.approx(expected[token], abs=1e-9), token


def severe_errors(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_javascript_filter_equals_python(browser, page_file):
    browser.get(page_file.as_uri())
    generator = torch.Generator().manual_seed(0)
    vectors = [torch.randn(50, generator=generator, dtype=torch.float64) * scale for scale in (0.5, 2.0, 4.0)]
    vectors.append(torch.tensor([2.0, 2.0, 2.0, 1.0, 1.0, 0.0, -1.0, 3.0], dtype=torch.float64))  # ties at the k-th place
    settings = [(1.0, 0, None), (0.7, 5, None), (1.3, 0, 0.9), (0.5, 10, 0.8), (2.0, 3, 0.5), (1.0, 1, None),
                (0.25, 0, 0.95), (1.0, 2, None), (1.0, 3, 0.99), (0.8, 0, 1.0), (1.0, 100, 0.3), (0, 0, None), (0, 3, 0.5)]
    for logits in vectors:
        for temperature, top_k, top_p in settings:
            shown = browser.execute_script(
                "return window.llmcourseSampling.distribution(arguments[0], arguments[1], arguments[2], arguments[3]);",
                logits.tolist(), temperature, top_k, top_p)
            expected = next_token_distribution(logits, temperature, top_k or None, top_p)
            shown = torch.tensor(shown, dtype=torch.float64)
            assert torch.equal(shown > 0, expected > 0), (logits.tolist(), temperature, top_k, top_p)
            torch.testing.assert_close(shown, expected, atol=1e-9, rtol=0)
    ties = browser.execute_script("return window.llmcourseSampling.distribution([2, 2, 2, 1, 1, 0, -1, 3], 1, 2, null);")
    assert sum(p > 0 for p in ties) == 4  # 3 and the three tied 2s


def test_sliders_reshape_the_bars_and_pick_the_nearest_text(browser, page_file):
    from selenium.webdriver.common.keys import Keys

    browser.get(page_file.as_uri())
    page = SamplerPage(browser, "sampler")
    assert browser.find_element("id", "sampler").get_attribute("data-ready") == "1"
    # The sliders start on the grid point nearest temperature 1: 0.8, top-k off, top-p 1.
    assert page.text() == page.expected_text(0.8, 0, 1.0) and page.text()
    assert_bars(page.bars(), page.expected_bars(0.8, 0, 1.0))
    assert page.element("kept").text == "75 of 75 tokens can be drawn"
    start_text, start_bars = page.text(), page.bars()

    page.press("temperature", Keys.HOME)  # the keyboard drags it to 0: greedy
    assert page.element("temperature-value").text == "0.00"
    assert page.text() == page.expected_text(0.0, 0, 1.0) != start_text
    assert page.bars() != start_bars and sorted(page.bars().values())[-2:] == [0.0, 1.0]
    assert page.element("kept").text == "1 of 75 tokens can be drawn"

    page.set_slider("temperature", 1.4)  # between grid points: the text is 1.5's, the bars are exactly 1.4's
    page.set_slider("top_k", 4)          # nearer 3 than 75 on a log scale
    assert page.element("top_k-value").text == "4"
    assert page.text() == page.expected_text(1.5, 3, 1.0)
    assert_bars(page.bars(), page.expected_bars(1.4, 4, 1.0))
    assert page.element("kept").text == "4 of 75 tokens can be drawn"

    page.press("top_p", *[Keys.ARROW_LEFT] * 8)  # 1.00 -> 0.60, one step of 0.05 a key
    assert page.element("top_p-value").text == "0.60"
    assert page.text() == page.expected_text(1.5, 3, 0.6)
    assert_bars(page.bars(), page.expected_bars(1.4, 4, 0.6))
    assert "Written by the model at temperature 1.50, top-k 3, top-p 0.60 (seed 1)" in page.element("grid").text
    assert severe_errors(browser) == []


def test_the_built_book_runs_the_sampler(browser):
    if not BOOK_PAGE.is_file():
        pytest.skip(f"the book is not built ({BOOK_PAGE.relative_to(ROOT)} is missing): jupyter-book build . first")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(BOOK_PAGE.as_uri())
    samplers = browser.find_elements(By.CSS_SELECTOR, "div.llmc-sampler")
    assert len(samplers) == 1, "the page should hold the notebook's one static sampler, as HTML (not as text)"
    assert samplers[0].get_attribute("data-ready") == "1", "the sampler's script did not run in the built page"
    page = SamplerPage(browser, samplers[0].get_attribute("id"))
    assert page.text() == page.expected_text(1.0, 0, 1.0) and page.text()
    assert_bars(page.bars(), page.expected_bars(1.0, 0, 1.0))
    before_text, before_bars = page.text(), page.bars()

    page.press("temperature", Keys.HOME)
    assert page.text() == page.expected_text(0.0, 0, 1.0) != before_text
    assert page.bars() != before_bars and max(page.bars().values()) == 1.0

    page.set_slider("temperature", 1.0)
    page.set_slider("top_k", 10)
    assert page.text() == page.expected_text(1.0, 10, 1.0)
    assert_bars(page.bars(), page.expected_bars(1.0, 10, 1.0))
