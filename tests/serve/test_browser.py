"""End to end in headless Chromium (Debian's package, driven through its chromedriver) against
a live server on 127.0.0.1: draw a digit and predict it, train and watch progress, stream a
mock generation."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from ml_engine.server import create_app
from tests.serve.conftest import live_server, serve_config

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
        "chromium-driver)",
    ),
]


@pytest.fixture
def browser() -> Iterator:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    # an explicit driver path: selenium downloads nothing
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture
def server_url(tmp_path: Path, trained_runs: Path) -> Iterator[str]:
    runs = tmp_path / "runs"
    shutil.copytree(trained_runs, runs)  # the job trained here must not leak into other tests
    cfg = serve_config(tmp_path, runs_dir=runs, **{"paths.models_dir": str(tmp_path / "models")})
    with live_server(create_app(cfg)) as url:
        yield url


def _wait(driver, condition, timeout: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def _text(driver, selector: str) -> str:
    # read in the page: job rows are re-rendered every second, so element handles go stale
    script = "const e = document.querySelector(arguments[0]); return e ? e.textContent : '';"
    return driver.execute_script(script, selector).strip()


def _draw_a_one(driver) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    canvas = driver.find_element(By.ID, "canvas")
    actions = ActionChains(driver).move_to_element_with_offset(canvas, 0, -90).click_and_hold()
    for _ in range(18):
        actions.move_by_offset(0, 10)
    actions.release().perform()


def test_ui_predicts_trains_and_generates(browser, server_url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(server_url + "/")
    _wait(browser, lambda d: "%" in _text(d, "tr[data-model=cnn_mnist] .val-acc"))
    assert _text(browser, "#health") == "ok"

    # draw on the canvas and predict with the trained checkpoint
    _draw_a_one(browser)
    drawn = browser.execute_script(
        "const c = document.getElementById('canvas').getContext('2d');"
        "const d = c.getImageData(0, 0, 280, 280).data; let n = 0;"
        "for (let i = 0; i < d.length; i += 4) if (d[i] > 128) n++; return n;"
    )
    assert drawn > 1000, "the drag left no stroke on the canvas"
    browser.find_element(By.ID, "predict-btn").click()
    _wait(browser, lambda d: _text(d, "#prediction-digit") != "")
    assert _text(browser, "#prediction-digit") == "1"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#probabilities .bar")) == 10
    assert "fixture" in _text(browser, "#prediction-run")

    # start a training job and watch it progress, then cancel it
    epochs = browser.find_element(By.ID, "epochs")
    epochs.clear()
    epochs.send_keys("2")
    browser.find_element(By.CSS_SELECTOR, ".train-btn[data-model=mlp_mnist]").click()
    row = "#jobs-table tr.job"
    _wait(browser, lambda d: _text(d, f"{row} .status") in ("queued", "running"), 30)
    _wait(
        browser,
        lambda d: (
            " step " in _text(d, f"{row} .progress-text")
            and "step 0 " not in _text(d, f"{row} .progress-text")
        ),
        240,
    )
    assert _text(browser, f"{row} .status") == "running"
    assert "epoch " in _text(browser, f"{row} .progress-text")
    browser.execute_script(f"document.querySelector('{row} .cancel-btn').click()")
    _wait(browser, lambda d: _text(d, f"{row} .status") == "cancelled", 60)

    # stream a mock generation into the page
    _wait(browser, lambda d: len(Select(d.find_element(By.ID, "backend")).options) == 2)
    Select(browser.find_element(By.ID, "backend")).select_by_visible_text("mock")
    Select(browser.find_element(By.ID, "llm-model")).select_by_visible_text("tiny")
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("alpha beta gamma delta")
    browser.find_element(By.ID, "generate-btn").click()
    _wait(browser, lambda d: _text(d, "#generation-status").startswith("done"), 60)
    assert _text(browser, "#generation-output") == "alpha beta gamma delta"
    assert "4 pieces" in _text(browser, "#generation-status")
    assert _text(browser, "#error") == ""
