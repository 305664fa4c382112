"""The README's screenshots of the playground: ``python docs/serve/screenshot.py MODEL_FOLDER [--url URL]``.

Serves MODEL_FOLDER with ``dual-lm serve`` (tests/servers.py), or uses a server already running at
``--url``, drives headless Chromium (selenium, /usr/bin/chromium and /usr/bin/chromedriver) through
a diffusion run and a speculative run of "ROMEO:", and writes docs/serve/playground.png and
docs/serve/playground-speculative.png.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests"))

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars")  # fmt: skip
RUNS = [  # (file, mode, {option id: value})
    ("playground.png", "diffusion", {"max_tokens": 32, "steps": 16, "temperature": 0}),
    ("playground-speculative.png", "speculative", {"max_tokens": 32, "k": 4, "temperature": 0}),
]


@contextlib.contextmanager
def browser(width: int = 1280, height: int = 900):
    """A headless Chromium driven by the system chromedriver (selenium-manager downloads nothing)."""
    os.environ.setdefault("SE_AVOID_BROWSER_DOWNLOAD", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="playground-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def run_mode(driver, url: str, mode: str, values: dict, prompt: str = "ROMEO:", timeout: float = 300) -> None:
    """Load the playground, choose ``mode``, fill in the options, run and wait until it is done."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from browser import play

    driver.get(url + "/")
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model").text not in ("", "loading…"))
    if play(driver, mode, prompt, values, timeout) == "error":
        raise RuntimeError(f"the playground failed: {driver.find_element(By.ID, 'error').text}")


def shoot(driver, path: Path, width: int = 1280) -> None:
    """A screenshot of the whole page (the window grown to the page's height)."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, height + 140)  # the window's frame: headless counts it too
    driver.save_screenshot(str(path))
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def take(url: str, out: Path) -> None:
    with browser() as driver:
        for name, mode, values in RUNS:
            driver.set_window_size(1280, 900)
            run_mode(driver, url, mode, values)
            shoot(driver, out / name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the model folder to serve")
    parser.add_argument("--url", help="a server already serving the folder (then none is started)")
    parser.add_argument("--out", type=Path, default=HERE, help="where the PNGs go (default: docs/serve)")
    args = parser.parse_args(argv)
    if args.url:
        take(args.url.rstrip("/"), args.out)
        return 0
    from servers import serving

    with serving(args.folder) as served:
        try:
            take(served.url, args.out)
        finally:
            log = served.log
    log.unlink(missing_ok=True)  # serving() keeps the server's log in the temporary folder
    return 0


if __name__ == "__main__":
    sys.exit(main())
