"""End to end in headless Chromium (Debian's package, driven through its chromedriver) against
a live server on 127.0.0.1: draw a digit and predict it, train and watch progress, stream a
mock generation; the layout at common window sizes, with screenshots kept as artifacts."""

from __future__ import annotations

import importlib.util
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ml_engine.run.locations import PROJECT_ROOT
from ml_engine.server import create_app
from ml_engine.server.jobs_store import new_job_id
from tests.server.conftest import (
    CHROMEDRIVER,
    CHROMIUM,
    held_job_overrides,
    live_server,
    serve_config,
    write_study,
    write_sweeps,
)

RELEASE = "release-held-jobs"  # under the test's tmp_path

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
        "chromium-driver)",
    ),
]


@pytest.fixture
def server_url(tmp_path: Path, trained_runs: Path) -> Iterator[str]:
    runs = tmp_path / "runs"
    shutil.copytree(trained_runs, runs)  # the job trained here must not leak into other tests
    # every job holds at step 30 until a test creates RELEASE: what the page must show while a
    # job runs stays on screen however fast the machine
    cfg = serve_config(
        tmp_path,
        runs_dir=runs,
        **{
            "paths.models_dir": str(tmp_path / "models"),
            "jobs.extra_overrides": held_job_overrides(30, tmp_path / RELEASE),
        },
    )
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
    # nothing downloaded: the packaged model trained here is preselected
    picker = Select(browser.find_element(By.ID, "llm-model"))
    assert picker.first_selected_option.get_attribute("value") == "shakespeare"
    picker.select_by_value("tiny")
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("alpha beta gamma delta")
    browser.find_element(By.ID, "generate-btn").click()
    _wait(browser, lambda d: _text(d, "#generation-status").startswith("done"), 60)
    assert _text(browser, "#generation-output") == "alpha beta gamma delta"
    assert "4 pieces" in _text(browser, "#generation-status")
    assert _text(browser, "#error") == ""


# ---- charts ---------------------------------------------------------------------------------

POINTS = "const e = document.getElementById(arguments[0]); return e ? Number(e.dataset.points) : 0;"
# uPlot drew a chart (its canvas inside its own box), not only a count in the page
CHART_DRAWN = """
const box = document.getElementById(arguments[0]);
return box && box.querySelector('canvas') ? box.querySelector('.uplot') !== null : false;
"""


def _resources(driver) -> list[str]:
    return driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name);"
    )


def test_a_training_jobs_curves_grow_while_it_runs(
    browser, server_url: str, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    browser.get(server_url + "/")
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".train-btn[data-model=cnn_mnist]"))
    epochs = browser.find_element(By.ID, "epochs")
    epochs.clear()
    epochs.send_keys("3")  # 75 steps, held at step 30 until the page has drawn 30 points
    browser.find_element(By.CSS_SELECTOR, ".train-btn[data-model=cnn_mnist]").click()
    # the card draws the new job's step loss as it trains: the count grows, then stops at 75
    seen: list[int] = []

    def finished(driver) -> bool:
        count = driver.execute_script(POINTS, "chart-step-loss")
        if count and (not seen or seen[-1] != count):
            seen.append(count)
        if count == 30:
            (tmp_path / RELEASE).touch()
        return _text(driver, "#jobs-table tr.job .status") == "succeeded" and count == 75

    _wait(browser, finished, 240)
    assert 30 in seen and seen[-1] == 75 and seen == sorted(seen), seen
    job_id = browser.execute_script("return document.querySelector('#jobs-table tr.job').id")[4:]
    curves = httpx.get(f"{server_url}/ml/jobs/{job_id}/curves").json()
    _wait(browser, lambda d: d.execute_script(POINTS, "chart-epoch-acc") == 3, 30)
    for chart, kind in (("step-loss", "step"), ("epoch-loss", "epoch"), ("epoch-acc", "epoch")):
        assert browser.execute_script(POINTS, f"chart-{chart}") == len(curves[kind]["x"])
        assert browser.execute_script(CHART_DRAWN, f"chart-{chart}"), chart
    # the uPlot instance's own data: x values are the steps the API returned
    xs = browser.execute_script("return Array.from(curves.charts.get('step-loss').data[0]);")
    assert xs == curves["step"]["x"] == list(range(1, 76))
    labels = browser.execute_script(
        "return curves.charts.get('epoch-acc').series.slice(1).map(s => s.label);"
    )
    assert sorted(labels) == ["train/acc", "val/acc"]
    assert "3 epochs" in _text(browser, "#curves-title")
    # the chart library came from this server, as every other request did
    loaded = _resources(browser)
    assert any(name == f"{server_url}/static/uPlot.iife.min.js" for name in loaded), loaded
    assert all(name.startswith(server_url) for name in loaded), loaded
    assert _text(browser, "#error") == ""
    browser.execute_script("document.getElementById('curves-section').scrollIntoView()")
    _save_screenshots(browser, "ui-curves", [ARTIFACTS_DIR])  # a look at the charts


@pytest.fixture
def sweeps_server(tmp_path: Path, trained_runs: Path) -> Iterator[str]:
    dirs = {k: str(v) for k, v in write_sweeps(tmp_path / "outputs").items()}
    write_study(Path(dirs["train"]) / "2025-01-02_00-00-00_train-sweep")  # an Optuna sweep
    cfg = serve_config(
        tmp_path,
        runs_dir=trained_runs,
        **{"paths.models_dir": str(tmp_path / "models"), "sweeps_dirs": dirs},
    )
    with live_server(create_app(cfg)) as url:
        yield url


SWEEP_VALUES = (
    "return [...document.querySelectorAll('#sweep-table tbody tr')]"
    ".map(r => r.querySelector('.value').textContent);"
)
PLOT_WIDTH = (
    "const i = document.getElementById('sweep-plot');"
    "return i.hidden || !i.complete ? 0 : i.naturalWidth;"
)
STUDY_IMAGES = (
    "return [...document.querySelectorAll('#study-plots figure')].map(f => [f.dataset.plot,"
    " f.querySelector('img').complete ? f.querySelector('img').naturalWidth : 0,"
    " f.querySelector('a').getAttribute('href')]);"
)
# plotly drew its chart in the study page: its SVG exists
PLOTLY_DRAWN = "return !!window.Plotly && !!document.querySelector('.plotly-graph-div .main-svg');"


def test_a_sweeps_table_is_sorted_by_its_metric_and_its_plot_loads(
    browser, sweeps_server: str
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(sweeps_server + "/")
    _wait(browser, lambda d: len(Select(d.find_element(By.ID, "sweep")).options) == 2, 60)
    picker = Select(browser.find_element(By.ID, "sweep"))
    names = {o.text.split(" ")[0]: o.get_attribute("value") for o in picker.options}

    picker.select_by_value(names["2025-01-02_00-00-00_train-sweep"])
    _wait(browser, lambda d: d.execute_script(SWEEP_VALUES) == ["0.9300", "0.6100", "—"], 30)
    assert _text(browser, "#sweep-metric") == "val/acc_best (max)"
    assert "highest first" in _text(browser, "#sweep-info")
    # the failed job's error is text: its markup is shown, not parsed
    assert browser.execute_script("return document.querySelectorAll('#sweep-table b').length") == 0
    assert "lr <b>9</b>" in _text(browser, "#sweep-table tbody tr:last-child .error")
    assert browser.execute_script("return document.getElementById('sweep-plot').hidden")
    # its Optuna study: each PNG loads, linked to its interactive page
    _wait(browser, lambda d: all(w > 0 for _, w, _ in d.execute_script(STUDY_IMAGES) or [[0, 0]]))
    study = browser.execute_script(STUDY_IMAGES)
    assert [name for name, _, _ in study] == ["history", "importances", "parallel_coordinate"]
    assert browser.find_element(By.ID, "study-title").is_displayed()
    base = "/ml/sweeps/2025-01-02_00-00-00_train-sweep/study"
    assert [link for _, _, link in study] == [f"{base}/{n}.html" for n, _, _ in study]
    study_page = sweeps_server + study[0][2]
    browser.execute_script("document.getElementById('study-plots').scrollIntoView()")
    _save_screenshots(browser, "ui-study", [ARTIFACTS_DIR])

    picker.select_by_value(names["2025-01-02_00-00-00_generate-sweep"])
    _wait(browser, lambda d: d.execute_script(SWEEP_VALUES) == ["20.25", "12.50"], 30)
    _wait(browser, lambda d: d.execute_script(PLOT_WIDTH) > 0, 30)
    assert all(name.startswith(sweeps_server) for name in _resources(browser))
    assert _text(browser, "#error") == ""
    browser.execute_script("document.getElementById('sweeps-section').scrollIntoView()")
    _save_screenshots(browser, "ui-sweeps", [ARTIFACTS_DIR])
    assert (
        browser.execute_script("return document.querySelectorAll('#study-plots img').length") == 0
    )

    # the interactive page works offline: plotly.js from beside it, nothing from elsewhere
    browser.get(study_page)
    _wait(browser, lambda d: d.execute_script(PLOTLY_DRAWN), 30)
    loaded = _resources(browser)
    assert f"{sweeps_server}{base}/plotly.min.js" in loaded
    assert all(name.startswith(sweeps_server) for name in loaded), loaded


# ---- layout ---------------------------------------------------------------------------------

# git-ignored (outputs/*): screenshots survive the test run for a look, and CI can upload them
ARTIFACTS_DIR = PROJECT_ROOT / "outputs" / "test-artifacts"

# Every rendered control, in the page: brought into view, then checked for lying inside the
# viewport and its card, and for being what the pointer hits at its centre (not covered by
# another card or by a table that spilled out of its own).
CHECK_CONTROLS = """
const selector = "button, input, select, textarea, canvas, progress, th";
const viewWidth = document.documentElement.clientWidth;
const name = (e) => e.tagName.toLowerCase() + (e.id ? "#" + e.id : "")
  + (e.dataset.model ? `[data-model=${e.dataset.model}]` : "")
  + (e.tagName === "TH" ? `(${e.closest("table").id}: '${e.textContent.trim()}')` : "")
  + (e.closest("tr.job") ? `(${e.closest("tr.job").id})` : "");
const found = [];
for (const e of document.querySelectorAll(selector)) {
  if (!e.getClientRects().length) continue;  // not rendered: the API-key form without a key
  e.scrollIntoView({ block: "center", inline: "center" });
  const r = e.getBoundingClientRect();
  const problems = [];
  if (r.width < 1 || r.height < 1) problems.push(`has no size (${r.width}x${r.height})`);
  if (r.left < -0.5 || r.right > viewWidth + 0.5) {
    problems.push(`spans x ${r.left.toFixed(0)}..${r.right.toFixed(0)}, viewport ${viewWidth}`);
  }
  const card = e.closest("main > section");
  if (card) {
    const c = card.getBoundingClientRect();
    if (r.left < c.left - 0.5 || r.right > c.right + 0.5) {
      problems.push(`spills out of #${card.id} (x ${r.left.toFixed(0)}..${r.right.toFixed(0)}`
        + ` in ${c.left.toFixed(0)}..${c.right.toFixed(0)})`);
    }
  }
  const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
  if (!hit || !(hit === e || e.contains(hit))) {
    const where = hit && hit.closest("section") ? " in #" + hit.closest("section").id : "";
    problems.push(`is covered by ${hit ? name(hit) + where : "nothing"}`);
  }
  found.push({ element: e, name: name(e), problems });
}
window.scrollTo(0, 0);
return found;
"""

CARD_RECTS = """
return [...document.querySelectorAll("main > section")].map((s) => {
  const r = s.getBoundingClientRect();
  const top = r.top + scrollY;
  return { id: s.id, left: r.left, right: r.right, top, bottom: top + r.height };
});
"""

# a table that fits needs no scrolling: at the sizes tested every column is in view at once
TABLES_SCROLLING = """
return [...document.querySelectorAll(".table-wrap")]
  .filter((w) => w.scrollWidth > w.clientWidth + 1)
  .map((w) => `${w.querySelector("table").id}: ${w.scrollWidth}px in ${w.clientWidth}px`);
"""


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    # one pixel of slack for sub-pixel rounding of adjacent edges
    return (
        a["left"] < b["right"] - 1
        and b["left"] < a["right"] - 1
        and a["top"] < b["bottom"] - 1
        and b["top"] < a["bottom"] - 1
    )


def _seed_jobs(app) -> None:
    """A finished and a failed job, so the Jobs table shows progress, metrics and an error."""
    store = app.state.server.store
    now = time.time()
    done = store.create(new_job_id(), "cnn_mnist", {"epochs": 2}, [], "/runs/seeded_ok")
    store.update(
        done.id,
        status="succeeded",
        started_at=now - 60,
        finished_at=now - 5,
        progress={
            "epoch": 2,
            "max_epochs": 2,
            "epochs_done": 2,
            "batch": 25,
            "batches_per_epoch": 25,
            "step": 50,
            "stage": "test",
        },
        metrics={"val/acc": 0.9512, "test/acc": 0.9433, "train/loss_step": 0.1234},
    )
    failed = store.create(new_job_id(), "mlp_mnist", {"epochs": 2}, [], "/runs/seeded_failed")
    store.update(
        failed.id,
        status="failed",
        finished_at=now,
        error="datamodule.data_dir=/a/very/long/path/that/has/no/spaces/to/break/at/mnist"
        "/raw/train-images-idx3-ubyte is not readable <img src=x>",
    )


@pytest.fixture
def layout_server(tmp_path: Path, trained_runs: Path) -> Iterator[str]:
    runs = tmp_path / "runs"
    shutil.copytree(trained_runs, runs)
    dirs = {k: str(v) for k, v in write_sweeps(tmp_path / "outputs").items()}
    values = {"paths.models_dir": str(tmp_path / "models"), "sweeps_dirs": dirs}
    cfg = serve_config(tmp_path, runs_dir=runs, **values)
    app = create_app(cfg)
    _seed_jobs(app)
    with live_server(app) as url:
        yield url


def _set_viewport(driver, width: int, height: int) -> None:
    # the viewport itself, not the window: a window of that size has a smaller viewport
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )


def _save_screenshots(driver, name: str, folders: list[Path]) -> list[Path]:
    """The viewport as a user first sees it, and the whole page when it is taller."""
    import base64

    taller = driver.execute_script(
        "return document.documentElement.scrollHeight > window.innerHeight"
    )
    full = None
    if taller:
        shot = {"format": "png", "captureBeyondViewport": True}
        full = base64.b64decode(driver.execute_cdp_cmd("Page.captureScreenshot", shot)["data"])
    saved = []
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(folder / f"{name}.png"))
        saved.append(folder / f"{name}.png")
        if full is not None:
            (folder / f"{name}-full.png").write_bytes(full)
            saved.append(folder / f"{name}-full.png")
    return saved


@pytest.mark.parametrize(("width", "height"), [(1280, 800), (1440, 900), (1920, 1080)])
def test_every_control_is_visible_and_clickable(
    browser, layout_server: str, tmp_path: Path, width: int, height: int
) -> None:
    _set_viewport(browser, width, height)
    browser.get(layout_server + "/")
    models = httpx.get(layout_server + "/ml/models").json()["models"]
    trainable = [m["name"] for m in models if m["trainable"]]
    _wait(
        browser,
        lambda d: d.execute_script(
            "return document.querySelectorAll('.train-btn').length === arguments[0]"
            " && document.querySelectorAll('#jobs-table tr.job').length === 2"
            " && document.querySelector('#llm-model').options.length > 0"
            " && document.querySelector('#device').options.length > 0"
            " && document.querySelectorAll('#sweep-table tbody tr').length > 0",
            len(trainable),
        ),
        60,
    )
    assert browser.execute_script("return document.documentElement.clientWidth") <= width
    assert _text(browser, "#error") == ""
    # server text is shown as text, never parsed as markup
    assert browser.execute_script("return document.querySelectorAll('#jobs-table img').length") == 0
    assert "<img src=x>" in _text(browser, "#jobs-table .error")

    found = browser.execute_script(CHECK_CONTROLS)
    problems = [f"{c['name']} {p}" for c in found for p in c["problems"]]
    problems += [f"{c['name']} is not displayed" for c in found if not c["element"].is_displayed()]
    problems += [f"table {t} scrolls" for t in browser.execute_script(TABLES_SCROLLING)]
    cards = browser.execute_script(CARD_RECTS)
    problems += [
        f"cards #{a['id']} and #{b['id']} overlap"
        for i, a in enumerate(cards)
        for b in cards[i + 1 :]
        if _overlap(a, b)
    ]
    problems += [f"card #{c['id']} ends at x={c['right']:.0f}" for c in cards if c["right"] > width]

    folders = [tmp_path / "test-artifacts", ARTIFACTS_DIR]
    saved = _save_screenshots(browser, f"ui-{width}x{height}", folders)
    assert all(path.stat().st_size > 0 for path in saved)
    assert not problems, "\n".join(problems)

    # the check covered what the issue named, not just whatever happened to render
    names = {c["name"] for c in found}
    expected = {"input#epochs", "select#device", "canvas#canvas", "select#predict-model"}
    expected |= {"button#clear-btn", "button#predict-btn", "select#backend", "select#llm-model"}
    expected |= {"input#max-tokens", "textarea#prompt", "button#generate-btn"}
    expected |= {f"button[data-model={m}]" for m in trainable}
    expected |= {"th(jobs-table: 'Metrics')", "th(jobs-table: 'Progress')"}
    expected |= {"th(models-table: 'Best val acc')", "th(models-table: 'Date')"}
    expected |= {"select#sweep", "th(sweep-table: 'Overrides')"}
    assert expected <= names, sorted(expected - names)
    assert sum(1 for n in names if n.startswith("progress")) == 2


def test_pickers_offer_what_this_machine_has(browser, tmp_path: Path, trained_runs: Path) -> None:
    """Devices from the server (no gpu without CUDA); the LLM model preselected has a file."""
    import torch
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    models = tmp_path / "models"
    models.mkdir()
    # a stand-in for a downloaded file: the picker only looks at what is on disk
    (models / "Mistral-7B-Instruct-v0.3-Q4_K_M.gguf").write_bytes(b"GGUF")
    cfg = serve_config(tmp_path, runs_dir=trained_runs, **{"paths.models_dir": str(models)})
    with live_server(create_app(cfg)) as url:
        browser.get(url + "/")
        _wait(browser, lambda d: len(Select(d.find_element(By.ID, "llm-model")).options) > 1, 60)
        _wait(browser, lambda d: len(Select(d.find_element(By.ID, "device")).options) > 0, 60)
        devices = [o.text for o in Select(browser.find_element(By.ID, "device")).options]
        assert "cpu" in devices and "auto" in devices and "cuda" not in devices
        assert ("gpu" in devices) == torch.cuda.is_available()
        assert Select(browser.find_element(By.ID, "device")).first_selected_option.text == "cpu"
        picker = Select(browser.find_element(By.ID, "llm-model"))
        assert picker.first_selected_option.get_attribute("value") == "mistral_7b"
        labels = {o.get_attribute("value"): o.text for o in picker.options}
        assert labels["mistral_7b"] == "mistral_7b"
        assert labels["codellama_7b"] == "codellama_7b (no file on disk)"
        assert labels["tiny"] == "tiny (written on first use)"


def test_llm_picker_says_when_no_model_has_a_file(
    browser, tmp_path: Path, trained_runs: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    cfg = serve_config(
        tmp_path,
        runs_dir=trained_runs,
        **{"paths.models_dir": str(tmp_path / "models"), "llm.models": ["codellama_7b"]},
    )
    with live_server(create_app(cfg)) as url:
        browser.get(url + "/")
        _wait(browser, lambda d: len(Select(d.find_element(By.ID, "llm-model")).options) == 2, 60)
        selected = Select(browser.find_element(By.ID, "llm-model")).first_selected_option
        assert selected.text == "no model file on disk"
        assert selected.get_attribute("value") == ""
        browser.find_element(By.ID, "generate-btn").click()
        _wait(browser, lambda d: _text(d, "#error") != "", 30)
        assert "none has a file on disk" in _text(browser, "#error")


def test_a_given_gguf_is_preselected_and_generates(browser, tmp_path: Path, trained_runs) -> None:
    """``serve.py llm.files=[any.gguf]``: the page offers the file by its general.name and
    generates from it through llama.cpp."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from ml_engine.llm.gguf_writer import LlamaShape, write_random_llama

    shape = LlamaShape(
        n_vocab=512, n_embd=256, n_ff=512, n_layer=1, n_head=4, n_head_kv=4, n_ctx=256
    )
    given = write_random_llama(tmp_path / "download.gguf", shape, seed=1, name="My Model")
    cfg = serve_config(
        tmp_path,
        runs_dir=trained_runs,
        **{"paths.models_dir": str(tmp_path / "models"), "llm.files": [str(given)]},
    )
    with live_server(create_app(cfg)) as url:
        browser.get(url + "/")
        _wait(browser, lambda d: len(Select(d.find_element(By.ID, "llm-model")).options) > 1, 60)
        picker = Select(browser.find_element(By.ID, "llm-model"))
        assert picker.first_selected_option.get_attribute("value") == "My-Model"
        Select(browser.find_element(By.ID, "backend")).select_by_visible_text("llama_cpp")
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("Hello")
        browser.find_element(By.ID, "generate-btn").click()
        _wait(browser, lambda d: _text(d, "#generation-status").startswith("done"), 60)
        assert _text(browser, "#error") == ""
        assert "pieces" in _text(browser, "#generation-status")


@pytest.mark.skipif(
    importlib.util.find_spec("fastapi_offline") is None,
    reason="needs the fastapi-offline package (a dependency: pip install -e .)",
)
def test_docs_render_from_the_servers_own_files(browser, tmp_path: Path) -> None:
    cfg = serve_config(tmp_path, **{"paths.models_dir": str(tmp_path / "models")})
    with live_server(create_app(cfg)) as url:
        browser.get(url + "/docs")
        _wait(browser, lambda d: "ml-engine" in _text(d, ".swagger-ui .info .title"), 60)
        assert browser.find_elements("css selector", ".opblock-tag")  # the endpoint groups
        loaded = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name);"
        )
        assert loaded and all(name.startswith(url) for name in loaded), loaded
