"""The explorer in Chinese in a real browser: the seed's section titles, every view without a
console error, the en/zh switch, and the default from the browser's language."""

import pytest

from attnkit.apps import _i18n
from attnkit.apps.explore.server import export_html

from _explore_models import running_server

pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

from _browser import error_text, open_page, settle, severe, submit  # noqa: E402

ZH = _i18n.catalogue("zh")
VIEWS = ("tutorial", "mask", "translate", "gpt")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("explore-zh")) as srv:
        yield srv


@pytest.fixture
def fresh(driver, server):
    """No saved language choice before or after the test."""
    driver.get(server.url)
    driver.execute_script("localStorage.clear()")
    yield driver
    driver.execute_script("localStorage.clear()")


def headings(driver):
    return [h.text for h in driver.find_elements(By.CSS_SELECTOR, "#tutorial-body h2")]


def tab(driver, view):
    return driver.find_element(By.CSS_SELECTOR, f'.tab[data-view="{view}"]')


def test_the_zh_page_has_the_seed_titles_and_no_console_errors(fresh, server):
    driver = fresh
    open_page(driver, server.url + "?lang=zh")
    assert driver.execute_script("return document.documentElement.lang") == "zh-CN"
    assert [tab(driver, view).text for view in VIEWS] == [ZH[f"explore.tab.{v}"] for v in VIEWS]
    titles = headings(driver)
    assert "3.3.1 没有可训练权重的简单自注意力机制" in titles
    assert any(t.startswith("3.5.2 利用 dropout 掩码额外的注意力权重") for t in titles)
    body = driver.find_element(By.ID, "tutorial-body").text
    assert "attn_weights_2" in body and "0.1385" in body.replace(" ", "")  # names, numbers
    for view in VIEWS:
        tab(driver, view).click()
        settle(driver)
        assert error_text(driver, view) == "", view
        assert driver.find_elements(By.CSS_SELECTOR, f"#view-{view} canvas"), view
    assert "个单元格中有" in driver.find_element(By.ID, "explain-text").get_attribute(
        "textContent")
    assert severe(driver) == []


def test_the_switch_changes_the_words_and_is_remembered(fresh, server):
    driver = fresh
    open_page(driver, server.url + "?lang=zh", "mask")
    Select(driver.find_element(By.ID, "lang")).select_by_value("en")
    assert tab(driver, "mask").text == "Masks"
    assert "cells may attend" in driver.find_element(By.ID, "explain-text").text
    tab(driver, "tutorial").click()
    settle(driver)
    assert headings(driver)[0] == "3.3.1 A simple self-attention mechanism without trainable " \
                                  "weights"
    Select(driver.find_element(By.ID, "lang")).select_by_value("zh")
    assert headings(driver)[0] == "3.3.1 没有可训练权重的简单自注意力机制"
    open_page(driver, server.url)  # no ?lang=: the saved choice
    assert tab(driver, "tutorial").text == "教程"
    assert severe(driver) == []


def test_the_default_follows_the_browser_language(fresh, server):
    driver = fresh
    agent = driver.execute_script("return navigator.userAgent")
    try:
        driver.execute_cdp_cmd("Emulation.setUserAgentOverride",
                               {"userAgent": agent, "acceptLanguage": "zh-CN,zh;q=0.9"})
        open_page(driver, server.url)
        assert driver.execute_script("return navigator.language") == "zh-CN"
        assert tab(driver, "mask").text == "掩码"
    finally:
        driver.execute_cdp_cmd("Emulation.setUserAgentOverride",
                               {"userAgent": agent, "acceptLanguage": "en-US"})
    open_page(driver, server.url)
    assert tab(driver, "mask").text == "Masks"
    assert severe(driver) == []


def test_the_exported_page_speaks_zh_offline(driver, server, tmp_path):
    path = tmp_path / "explore.html"
    export_html(path, server.models)
    open_page(driver, path.as_uri() + "?lang=zh")
    assert driver.find_element(By.ID, "offline-note").text == ZH["explore.offline_note"]
    assert headings(driver)[0] == "3.3.1 没有可训练权重的简单自注意力机制"
    assert severe(driver) == []


def test_input_errors_are_shown_in_chinese(fresh, server):
    driver = fresh
    open_page(driver, server.url + "?lang=zh")
    submit(driver, "tutorial", "sentence", "")
    assert error_text(driver, "tutorial").startswith("句子是空的;请输入几个单词")
    open_page(driver, server.url + "?lang=zh", "mask")
    submit(driver, "mask", "mask-docs", "3,3")
    assert "各文档的长度必须为正,且加起来等于 S=16" in error_text(driver, "mask")
    open_page(driver, server.url + "?lang=zh", "translate")
    submit(driver, "translate", "date", "2001-3-1")
    assert "是不支持的格式" in error_text(driver, "translate")
    driver.get_log("browser")  # the 400 responses are logged; they are the point here
