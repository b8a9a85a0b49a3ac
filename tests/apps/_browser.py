"""Helpers for the explorer's browser tests (the browser itself is ``conftest.driver``)."""

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def settle(driver):
    """Wait until the page has no request in flight."""
    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script("return window.attnkit && window.attnkit.pending === 0"))


def severe(driver):
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def open_page(driver, url, view="tutorial"):
    driver.get(url)
    settle(driver)
    if view != "tutorial":
        driver.find_element(By.CSS_SELECTOR, f'.tab[data-view="{view}"]').click()
        settle(driver)


def submit(driver, view, field, text):
    box = driver.find_element(By.ID, field)
    box.clear()
    if text:
        box.send_keys(text)
    driver.find_element(By.CSS_SELECTOR, f"#{view}-form button[type=submit]").click()
    settle(driver)


def error_text(driver, view):
    box = driver.find_element(By.ID, f"{view}-error")
    return box.text if box.is_displayed() else ""
