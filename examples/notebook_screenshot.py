"""Take the README's screenshot of attnkit's notebook widget with headless chromium.

Needs the ``notebook`` extra (anywidget, ipykernel, nbclient, nbconvert), selenium, chromium
and chromedriver (``make browser``)::

    python examples/notebook_screenshot.py --out docs

Runs a two-cell notebook in a real kernel (``from attnkit import widgets`` and a mask widget),
exports it with nbconvert's JupyterLab template, opens the page offline and writes
``notebook_widget.png``. The exported page shows the widget's static copy, drawn by the same
JavaScript as the live widget; the screenshot hides the banner that says it is a copy, which
the live widget does not show. ``--keep-html`` also keeps the exported page.
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbclient
import nbconvert
import nbformat
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager
from selenium import webdriver
from selenium.webdriver.support.ui import WebDriverWait

CELLS = ("from attnkit import widgets",
         "# a causal sliding window of 16 keys: its pattern, the engine's block map,\n"
         "# explain()'s choice, and the attention() call that builds it\n"
         "widgets.mask(64, window=(15, 0), block_q=16, block_k=16)")


def executed_notebook(folder: Path):
    """The notebook of :data:`CELLS`, run in a kernel of this Python."""
    (folder / "attnkit-shot").mkdir()
    (folder / "attnkit-shot" / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "attnkit", "language": "python"}))
    km = KernelManager(kernel_name="attnkit-shot",
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(folder)]))
    km.start_kernel()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in CELLS]
    try:
        nbclient.NotebookClient(nb, km=km, timeout=120, store_widget_state=False).execute()
    finally:
        km.shutdown_kernel(now=True)
    return nb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--keep-html", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        nb = executed_notebook(Path(tmp))
        exporter = nbconvert.HTMLExporter(mathjax_url="data:text/javascript,",
                                          require_js_url="data:text/javascript,")
        body, _ = exporter.from_notebook_node(nb)
        page = Path(tmp) / "notebook.html"
        page.write_text(body, encoding="utf-8")
        if args.keep_html:
            shutil.copy(page, args.out / "notebook_widget.html")
        options = webdriver.ChromeOptions()
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1400,1000"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=webdriver.ChromeService(shutil.which("chromedriver")),
                                  options=options)
        try:
            driver.get(page.as_uri())
            WebDriverWait(driver, 30).until(lambda d: d.execute_script(
                "const h = document.querySelector('.attnkit-widget');"
                "return h && h.shadowRoot.querySelectorAll('canvas').length >= 2"))
            driver.execute_script("document.querySelector('.attnkit-widget').shadowRoot"
                                  ".getElementById('offline-note').hidden = true")
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
                "width": 1400, "height": 1250, "deviceScaleFactor": 1, "mobile": False})
            time.sleep(0.5)
            target = args.out / "notebook_widget.png"
            driver.save_screenshot(str(target))
            print(f"wrote {target}")
        finally:
            driver.quit()


if __name__ == "__main__":
    main()
