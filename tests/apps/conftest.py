"""Fixtures shared by the app tests: one torch thread, and one headless chromium for every
browser test module (started on first use)."""

import os
import shutil

import pytest
import torch

from _explore_models import REBIND_HOST


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The apps' tests run tiny models, which gain nothing from intra-op threads; on a shared
    2-core machine a second thread waiting for a busy core made them up to 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def english_terminal():
    """The apps pick their language from the terminal's locale; the tests expect English
    wherever they do not choose (a Chinese locale on the test machine must not change them)."""
    names = ("LC_ALL", "LC_MESSAGES", "LANG", "LANGUAGE")
    saved = {name: os.environ.pop(name, None) for name in names}
    os.environ["LANG"] = "C.UTF-8"
    yield
    for name, value in saved.items():
        os.environ.pop(name, None)
        if value is not None:
            os.environ[name] = value


def _find(*names):
    return next((path for name in names if (path := shutil.which(name))), None)


@pytest.fixture(scope="session")
def driver():
    """Debian's chromium, headless, through selenium; skipped (with the reason) without it.

    ``make test`` installs chromium and chromedriver with apt-get when they are missing (the
    ``browser`` target, as root or through sudo).
    """
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed: pip install -e '.[dev]'")
    browser = _find("chromium", "chromium-browser", "google-chrome")
    chromedriver = _find("chromedriver")
    if browser is None or chromedriver is None:
        pytest.skip("no chromium/chromedriver on PATH; `make browser` installs them with "
                    "apt-get (needs root or sudo and a package mirror)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--disable-extensions", "--lang=en-US",
                f"--host-resolver-rules=MAP {REBIND_HOST} 127.0.0.1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(service=webdriver.ChromeService(chromedriver), options=options)
    chrome.set_page_load_timeout(30)
    yield chrome
    chrome.quit()
