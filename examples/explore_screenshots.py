"""Take the README's screenshots of ``attnkit explore`` with headless chromium.

Needs selenium, chromium and chromedriver (``make browser``) and trained models::

    attnkit translate train --out out/translate
    attnkit gpt train --context 256 --out out/gpt
    python examples/explore_screenshots.py --out docs

Writes ``explore_tutorial.png``, ``explore_tutorial_causal.png``, ``explore_mask.png``,
``explore_translate.png`` and ``explore_gpt.png`` to ``--out``; ``--views tutorial mask``
takes only those (no trained model needed for them).
"""

import argparse
import shutil
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from attnkit.apps.explore.model_view import Models
from attnkit.apps.explore.server import make_server, serve_in_thread

GPT_PROMPT = ("Attention lets every character look back at the ones before it. Each query is "
              "compared with every key; the softmax of the scores weights the values. These "
              "are the heads of a small GPT trained on Python's help text.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--translator", default="out/translate")
    parser.add_argument("--gpt", default="out/gpt/gpt.pt")
    parser.add_argument("--views", nargs="+", default=["tutorial", "mask", "translate", "gpt"],
                        choices=["tutorial", "mask", "translate", "gpt"])
    args = parser.parse_args()
    server = make_server(0, models=Models(args.translator, args.gpt))
    serve_in_thread(server)
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(shutil.which("chromedriver")),
                              options=options)

    def settle():
        WebDriverWait(driver, 60).until(
            lambda d: d.execute_script("return window.attnkit.pending === 0"))

    def shot(name: str, height: int) -> None:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": 1400, "height": height, "deviceScaleFactor": 1, "mobile": False})
        time.sleep(0.5)
        driver.save_screenshot(str(args.out / f"explore_{name}.png"))
        print(f"wrote {args.out / f'explore_{name}.png'}")

    def tab(view: str) -> None:
        driver.find_element(By.CSS_SELECTOR, f'.tab[data-view="{view}"]').click()
        settle()

    def fill(field: str, value: str, view: str) -> None:
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
        driver.find_element(By.CSS_SELECTOR, f"#{view}-form button[type=submit]").click()
        settle()

    try:
        driver.get(server.url)
        settle()
        if "tutorial" in args.views:
            shot("tutorial", 1250)
            driver.execute_script("[...document.querySelectorAll('h2')].find(h => "
                                  "h.textContent.startsWith('3.5.1')).scrollIntoView()")
            shot("tutorial_causal", 1250)
            driver.execute_script("window.scrollTo(0, 0)")
        if "mask" in args.views:
            # A composed description: causal documents, chunked-local attention, padding.
            tab("mask")
            for field, value in (("mask-T", "32"), ("mask-S", "32"), ("mask-bq", "4"),
                                 ("mask-bk", "4"), ("mask-valid", "30"), ("mask-chunk", "16")):
                driver.find_element(By.ID, field).clear()
                driver.find_element(By.ID, field).send_keys(value)
            fill("mask-docs", "8,12,12", "mask")
            shot("mask", 1060)
        if "translate" in args.views:
            tab("translate")
            shot("translate", 1000)
        if "gpt" in args.views:
            tab("gpt")
            fill("prompt", GPT_PROMPT, "gpt")
            for field, value in (("gpt-layer", "1"), ("gpt-head", "0")):  # a broad head
                Select(driver.find_element(By.ID, field)).select_by_value(value)
            head_view = driver.find_element(By.ID, "head-view")
            ActionChains(driver).move_to_element_with_offset(head_view, -200, 300).perform()
            shot("gpt", 1080)
    finally:
        driver.quit()
        server.shutdown()


if __name__ == "__main__":
    main()
