"""The explorer in a real headless browser (Debian's chromium + chromedriver via selenium).

``make test`` installs chromium and chromedriver with apt-get when they are missing (the
``browser`` target); where that is impossible these tests skip and say why. The browser is
``conftest.driver`` (one per session); one server serves the whole module.
"""

import base64
import struct

import pytest
import torch

from attnkit import tutorial
from attnkit.apps import walkthrough
from attnkit.apps.explore.model_view import Models
from attnkit.apps.explore.server import export_html, make_server, serve_in_thread
from attnkit.apps.explore.tutorial_view import embed

from _explore_models import running_server

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed: pip install -e '.[dev]'")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

from _browser import error_text, open_page, settle, severe, submit  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("explore-browser")) as srv:
        yield srv


def line(driver, key):
    """The numbers of one labelled vector line, as floats."""
    text = driver.find_element(By.CSS_SELECTOR, f'[data-key="{key}"]').text
    return [float(x) for x in text[text.index("[") + 1:text.rindex("]")].split(",")]


def test_every_view_loads_without_console_errors(driver, server):
    open_page(driver, server.url)
    for view in ("tutorial", "mask", "translate", "gpt"):
        driver.find_element(By.CSS_SELECTOR, f'.tab[data-view="{view}"]').click()
        settle(driver)
        assert error_text(driver, view) == ""
        assert driver.find_elements(By.CSS_SELECTOR, f"#view-{view} canvas"), view
    assert severe(driver) == []
    assert "auto -> sdpa" in driver.find_element(By.ID, "explain-text").get_attribute("textContent")


def test_default_sentence_shows_the_published_values(driver, server):
    open_page(driver, server.url)
    assert line(driver, "simple.attn_weights.q") == list(walkthrough.PUBLISHED["attn_weights_2"])
    assert line(driver, "simple.context_vec.q") == list(walkthrough.PUBLISHED["context_vec_2"])
    checks = driver.find_elements(By.CSS_SELECTOR, "table.checks td.ok")
    assert len(checks) == len(walkthrough.PUBLISHED)


def test_hovering_a_cell_shows_its_number(driver, server):
    open_page(driver, server.url)
    canvas = driver.find_element(By.CSS_SELECTOR, 'canvas[data-title="attn_weights_2 = softmax"]')
    width, height = canvas.size["width"], canvas.size["height"]
    left, top, cell = 8 + 7 * len("journey"), 24, 46  # the heatmap's layout (core.js)
    x, y = left + cell // 2, top + cell + cell // 2  # row 1: "journey"
    ActionChains(driver).move_to_element_with_offset(canvas, x - width // 2,
                                                     y - height // 2).perform()
    tip = driver.find_element(By.ID, "tip")
    assert tip.is_displayed() and "journey -> journey: 0.237891" in tip.text  # 0.2379 published


def test_typing_a_sentence_updates_the_numbers(driver, server):
    open_page(driver, server.url)
    sentence = "attention is all you need"
    submit(driver, "tutorial", "sentence", sentence)
    inputs = embed(sentence.split())
    context, weights = tutorial.simple_self_attention(inputs)
    assert line(driver, "simple.attn_weights.q") == pytest.approx(weights[1].tolist(), abs=5e-5)
    torch.manual_seed(123)
    sa_v1 = tutorial.SelfAttentionV1(3, 2)
    driver.find_element(By.XPATH, "//div[@class='tokens']/button[text()='all']").click()
    assert line(driver, "simple.context_vec.q") == pytest.approx(context[2].tolist(), abs=5e-5)
    assert line(driver, "trainable.context_vec.q") == pytest.approx(
        sa_v1(inputs)[2].tolist(), abs=5e-5)
    driver.find_element(By.ID, "training").click()  # eval mode: dropout off
    assert "eval mode" in driver.find_element(By.ID, "tutorial-body").text
    assert severe(driver) == []


def test_bad_input_shows_a_clear_message(driver, server):
    open_page(driver, server.url)
    submit(driver, "tutorial", "sentence", "")
    assert "the sentence is empty" in error_text(driver, "tutorial")
    open_page(driver, server.url, "gpt")
    submit(driver, "gpt", "prompt", "caf\u00e9")
    assert "the model never saw in training: '\u00e9'" in error_text(driver, "gpt")
    submit(driver, "gpt", "prompt", "a" * 257)
    assert "257 characters but the model's context is 256" in error_text(driver, "gpt")
    open_page(driver, server.url, "mask")
    submit(driver, "mask", "mask-docs", "3,3")
    assert "add up to S=16" in error_text(driver, "mask")
    open_page(driver, server.url, "translate")
    submit(driver, "translate", "date", "   ")
    assert "the input is empty" in error_text(driver, "translate")
    driver.get_log("browser")  # the 400 responses are logged; they are the point here


def test_missing_checkpoint_is_shown_in_the_page(driver, tmp_path):
    srv = make_server(0, models=Models(tmp_path / "none", tmp_path / "none.pt"))
    serve_in_thread(srv)
    try:
        open_page(driver, srv.url, "translate")
        assert "attnkit translate train" in error_text(driver, "translate")
        open_page(driver, srv.url, "gpt")
        assert "no GPT checkpoint" in error_text(driver, "gpt")
    finally:
        srv.shutdown()
        srv.server_close()
    driver.get_log("browser")


def test_gpt_head_view_at_200_tokens(driver, server):
    open_page(driver, server.url, "gpt")
    submit(driver, "gpt", "prompt", "attention is all you need. " * 8)
    assert error_text(driver, "gpt") == ""
    head_view = driver.find_element(By.ID, "head-view")
    assert "(216 tokens)" in head_view.get_attribute("data-title")
    ActionChains(driver).move_to_element(head_view).perform()  # hover: one token's lines
    driver.find_element(By.ID, "model-view").click()  # a thumbnail opens in the head view
    assert severe(driver) == []


def _png_size(data_url):
    raw = base64.b64decode(data_url.split(",", 1)[1])
    assert raw.startswith(PNG_MAGIC)
    return struct.unpack(">II", raw[16:24])  # IHDR width, height


@pytest.mark.parametrize("view", ["tutorial", "mask", "translate", "gpt"])
def test_save_png(driver, server, view):
    open_page(driver, server.url, view)
    width, height = _png_size(driver.execute_script(f"return attnkit.exportPNG('{view}')"))
    assert width > 200 and height > 200
    driver.find_element(By.CSS_SELECTOR, f'.save-png[data-view="{view}"]').click()
    assert error_text(driver, view) == "" and severe(driver) == []


def test_exported_html_renders_offline(driver, server, tmp_path):
    path = tmp_path / "explore.html"
    export_html(path, server.models)
    open_page(driver, path.as_uri())
    assert driver.find_element(By.ID, "offline-note").is_displayed()
    assert line(driver, "simple.attn_weights.q") == list(walkthrough.PUBLISHED["attn_weights_2"])
    for view in ("mask", "translate", "gpt"):
        driver.find_element(By.CSS_SELECTOR, f'.tab[data-view="{view}"]').click()
        settle(driver)
        assert error_text(driver, view) == ""
    resources = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert [r for r in resources if not r.startswith(("file:", "data:"))] == []
    assert _png_size(driver.execute_script("return attnkit.exportPNG('gpt')"))[0] > 200
    driver.find_element(By.CSS_SELECTOR, '.tab[data-view="tutorial"]').click()
    submit(driver, "tutorial", "sentence", "new words")
    assert "needs the server" in error_text(driver, "tutorial")
    assert severe(driver) == []


def test_mask_view_draws_a_composed_description_and_its_block_map(driver, server):
    open_page(driver, server.url, "mask")
    for field, value in (("mask-T", "16"), ("mask-S", "16"), ("mask-docs", "6,10"),
                         ("mask-valid", "14"), ("mask-chunk", "8")):
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    driver.find_element(By.CSS_SELECTOR, "#mask-form button[type=submit]").click()
    settle(driver)
    assert error_text(driver, "mask") == ""
    text = driver.find_element(By.ID, "explain-text").get_attribute("textContent")
    assert "mask_mod=(masks.causal() & masks.chunked_local(8, causal=False) & " \
           "masks.documents(cu_seqlens=[0, 6, 16], causal=False)) & masks.key_padding(" in text
    assert "description: causal & chunked_local(8) & same_document(B=1) & key_padding" in text
    block_map = driver.find_element(By.ID, "block-map")
    assert block_map.get_attribute("data-title") == "block map (4 x 4 blocks)"
    legend = driver.find_element(By.CSS_SELECTOR, "#mask-body .legend").text
    assert "skipped (empty) (" in legend and "full (no mask) (" in legend
    assert severe(driver) == []
