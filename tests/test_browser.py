"""The page of `cbir serve` in a real headless Chromium, driven by Selenium: upload a photo,
see thumbnails of its matches, click one, see its neighbours, browse a category.

Needs Debian's `chromium` and `chromium-driver`. Without them it skips, except where
CBIR_REQUIRE_BROWSER=1 (CI sets it): there a missing browser is a failure, not a skip.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import TESTDATA, needs_shared
from tests.serving import REPO, Server

pytestmark = needs_shared
ARTIFACTS = REPO / "test-artifacts"
WAIT_S = 60


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def browser():
    found = _chromium()
    if found is None or not _has_selenium():
        why = "headless Chromium tests need chromium, chromium-driver and selenium"
        if os.environ.get("CBIR_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{why} (CBIR_REQUIRE_BROWSER=1: a skip would hide them)")
        pytest.skip(why)
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=found[1]),
                              options=options)  # fmt: skip
    yield driver
    driver.quit()


def text_of(driver, css: str) -> str:
    """The text of the first element matching `css` now ('' if none): read in one step, so
    an element the page replaces meanwhile cannot go stale."""
    return driver.execute_script("const e = document.querySelector(arguments[0]); "
                                 "return e ? e.textContent : '';", css)  # fmt: skip


def _has_selenium() -> bool:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def served(photos_db: Path):
    server = Server(photos_db)
    yield server
    server.stop()


def test_upload_see_matches_click_one_see_its_neighbours(browser, served: Server) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT_S)
    browser.get(served.url)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#categories button"))
    assert "37 images" in browser.find_element(By.ID, "summary").text

    query = TESTDATA / "near_duplicates" / "chelsea__rot5.jpg"
    browser.find_element(By.ID, "file").send_keys(str(query))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#grid[data-kind=results] .hit"))
    hits = browser.find_elements(By.CSS_SELECTOR, "#grid .hit")
    assert len(hits) == 20  # the page asks for 20
    assert "#1" in hits[0].text and "chelsea.jpg" in hits[0].text
    wait.until(lambda d: d.execute_script(  # the first thumbnails really arrived and decoded
        "return [...document.querySelectorAll('#grid .hit img')].slice(0, 5)"
        ".every(i => i.complete && i.naturalWidth > 0)"))
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "serve_query.png"))

    second = hits[1]
    clicked_id, clicked_text = second.get_attribute("data-id"), second.text
    second.click()
    wait.until(lambda d: "More like" in text_of(d, "#heading h2"))
    neighbours = browser.find_elements(By.CSS_SELECTOR, "#grid .hit")
    assert neighbours and clicked_id not in [n.get_attribute("data-id") for n in neighbours]
    assert clicked_text.splitlines()[-1].split("/")[-1] in text_of(browser, "#heading h2")
    browser.save_screenshot(str(ARTIFACTS / "serve_more_like_this.png"))

    largest = browser.find_elements(By.CSS_SELECTOR, "#categories button")[0]
    name, count = largest.text.splitlines()
    largest.click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#grid[data-kind=category] .hit"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#grid .hit")) == int(count)
    assert text_of(browser, "#heading h2") == name
    assert text_of(browser, "#error") == ""
