"""The playground page (``GET /``) in a real browser: headless Chromium driven by selenium against a
``dual-lm serve`` of the tiny model.

The page's text must be what the API answers for the same request, and its pictures of the modes
must match the events: one canvas slot per new position, one row per speculative round with one
verifier token, the accepted drafts the statistics count, one block per ``<mask>``.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
for _binary in (CHROMIUM, CHROMEDRIVER):
    if not _binary.exists():
        pytest.skip(f"{_binary} is absent (apt-get install chromium chromium-driver)", allow_module_level=True)
pytest.importorskip("selenium", reason="selenium is absent (the dev extra installs it)")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.select import Select  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from browser import play  # noqa: E402
from servers import serving, tiny_folder  # noqa: E402

PROMPT = "Hello"  # the tiny model accepts one of its drafts after it (k 2, 12 tokens) and rejects the rest
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--window-size=1280,1000")  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer_51200):
    folder = tiny_folder(tmp_path_factory.mktemp("playground") / "tiny", tokenizer_51200)
    with serving(folder) as server:
        yield server


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    os.environ.setdefault("SE_AVOID_BROWSER_DOWNLOAD", "true")  # selenium-manager must fetch nothing
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    browser.set_page_load_timeout(30)
    yield browser
    browser.quit()


def api(served, path: str, body: dict | None = None) -> dict:
    """The server's JSON answer to GET ``path`` (no body) or POST ``body``."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(served.url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())


def open_page(driver, served) -> None:
    driver.get(served.url + "/")
    WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "model").text not in ("", "loading…"))


def run(driver, served, mode: str, prompt: str | None = PROMPT, **values) -> str:
    """Choose ``mode``, type ``prompt`` and the options, click run; the state it ended in."""
    open_page(driver, served)
    state = play(driver, mode, prompt, values, 60)
    assert driver.find_element(By.ID, "run").is_enabled()  # enabled again once the run is over
    return state


def output(driver) -> str:
    return driver.find_element(By.ID, "output").get_property("textContent")


def stat(driver, key: str) -> float:
    return float(driver.find_element(By.CSS_SELECTOR, f'#stats .stat[data-key="{key}"]').get_attribute("data-value"))


def screenshot(driver, path: Path) -> None:
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 0 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_page_is_self_contained_and_names_the_model(driver, served):
    with urllib.request.urlopen(served.url + "/", timeout=30) as answer:
        assert answer.headers["content-type"].startswith("text/html")
        source = answer.read().decode()
    here = urllib.parse.urlsplit(served.url).netloc
    elsewhere = [u for u in re.findall(r"https?://[^\s\"'<>)]+", source) if urllib.parse.urlsplit(u).netloc != here]
    assert elsewhere == [], "the playground must load nothing from another host"
    assert not re.search(r"<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=", source, re.I)  # inline only
    assert "@import" not in source and "url(" not in source
    open_page(driver, served)
    name = api(served, "/v1/models")["data"][0]["id"]
    assert driver.find_element(By.ID, "model").text == name
    fetched = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert fetched and all(u.startswith(served.url + "/") for u in fetched), fetched
    assert driver.find_element(By.ID, "status").get_attribute("data-state") == "idle"


def test_diffusion_fills_the_canvas_and_streams_the_api_text(driver, served, tmp_path):
    assert run(driver, served, "diffusion", max_tokens=8, steps=4) == "done"
    assert not driver.find_element(By.ID, "k").is_displayed()  # another mode's option is hidden
    assert driver.find_element(By.ID, "steps").is_displayed()
    slots = driver.find_elements(By.CSS_SELECTOR, "#canvas .slot")
    assert len(slots) == 8
    assert not [s for s in slots if "mask" in s.get_attribute("class").split()]
    assert driver.find_elements(By.CSS_SELECTOR, "#canvas .slot.new")  # the last pass's commits, highlighted
    assert {s.get_attribute("data-step") for s in slots} <= {"1", "2", "3", "4"}  # when each was committed
    step = driver.find_element(By.ID, "step")
    assert step.get_attribute("data-step") == "4" and "4 / 4" in step.text
    assert len(driver.find_elements(By.CSS_SELECTOR, "#steps-grid .hrow")) == 4
    assert stat(driver, "forwards") == 4
    body = {"prompt": PROMPT, "mode": "diffusion", "max_tokens": 8, "steps": 4, "temperature": 0}
    assert output(driver) == api(served, "/v1/completions", body)["choices"][0]["text"]
    assert driver.find_element(By.ID, "echo").get_property("textContent") == PROMPT
    screenshot(driver, tmp_path / "diffusion.png")


def test_speculative_rounds_match_the_stats_and_the_causal_text(driver, served, tmp_path):
    assert run(driver, served, "speculative", max_tokens=12, k=2) == "done"
    rounds = driver.find_elements(By.CSS_SELECTOR, "#rounds .round")
    assert rounds
    assert driver.find_elements(By.CSS_SELECTOR, "#rounds .draft")
    accepted = 0
    for row in rounds:
        assert len(row.find_elements(By.CSS_SELECTOR, ".verifier")) == 1
        drafts = row.find_elements(By.CSS_SELECTOR, ".draft")
        marks = ["accepted" in d.get_attribute("class").split() for d in drafts]
        assert marks == sorted(marks, reverse=True)  # the accepted drafts come first
        assert all(("rejected" in d.get_attribute("class").split()) != m for d, m in zip(drafts, marks, strict=True))
        accepted += sum(marks)
    assert accepted == len(driver.find_elements(By.CSS_SELECTOR, "#rounds .draft.accepted"))
    assert accepted >= 1 and driver.find_elements(By.CSS_SELECTOR, "#rounds .draft.rejected"), "pick a prompt with both"
    assert accepted == round(stat(driver, "acceptance_rate") * stat(driver, "drafted"))
    assert stat(driver, "forwards") == len(rounds)  # one-pass drafting: a forward per round
    screenshot(driver, tmp_path / "speculative.png")
    spoken = output(driver)
    body = {"prompt": PROMPT, "mode": "speculative", "max_tokens": 12, "k": 2, "temperature": 0}
    assert spoken == api(served, "/v1/completions", body)["choices"][0]["text"]
    assert run(driver, served, "causal", max_tokens=12) == "done"
    assert output(driver) == spoken  # greedy speculative decoding is lossless
    assert not driver.find_elements(By.CSS_SELECTOR, "#rounds .round")


def test_fill_shows_the_candidates_of_every_mask(driver, served):
    open_page(driver, served)
    Select(driver.find_element(By.ID, "mode")).select_by_value("fill")
    text = driver.find_element(By.ID, "prompt").get_property("value")
    assert "<mask>" in text  # the example it prefills
    assert run(driver, served, "fill", prompt=None) == "done"
    answer = api(served, "/v1/fill", {"text": text, "top_k": 5})
    blocks = driver.find_elements(By.CSS_SELECTOR, "#fill .fill-mask")
    assert len(blocks) == text.count("<mask>") == len(answer["masks"])
    for block, mask in zip(blocks, answer["masks"], strict=True):
        candidates = block.find_elements(By.CSS_SELECTOR, ".candidate")
        assert len(candidates) == 5
        shown = [c.find_element(By.CSS_SELECTOR, ".piece").get_attribute("data-piece") for c in candidates]
        assert shown == [c["token"] for c in mask["candidates"]]
        assert all(c.find_element(By.CSS_SELECTOR, ".bar > div").size["width"] > 0 for c in candidates[:1])


def test_a_refused_request_shows_the_servers_message(driver, served):
    assert run(driver, served, "diffusion", max_tokens=4, steps=4, block_length=8) == "error"
    assert "block_length" in driver.find_element(By.ID, "error").text
