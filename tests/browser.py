"""Driving the playground page in a browser (selenium): shared by its test and docs/serve/screenshot.py."""

from __future__ import annotations

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait


def play(driver, mode: str, prompt: str | None, values: dict, timeout: float) -> str:
    """On the open page: choose ``mode``, type ``prompt`` (None: keep the box) and the options, click run,
    and wait for the run to end; the state it ended in (``done`` or ``error``)."""
    Select(driver.find_element(By.ID, "mode")).select_by_value(mode)
    if prompt is not None:
        box = driver.find_element(By.ID, "prompt")
        box.clear()
        box.send_keys(prompt)
    for name, value in values.items():
        field = driver.find_element(By.ID, name)
        field.clear()
        field.send_keys(str(value))
    driver.find_element(By.ID, "run").click()
    state = lambda d: d.find_element(By.ID, "status").get_attribute("data-state")  # noqa: E731
    WebDriverWait(driver, timeout).until(lambda d: state(d) in ("done", "error"))
    return state(driver)
