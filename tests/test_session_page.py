"""The session page in a real browser: headless Chromium (Debian's chromium and chromedriver,
scripts/install-chromium.sh) driven by selenium against a real daemon (tests/daemon_harness.py).

Without chromium or chromedriver the tests are skipped with the reason, except under
TOMOLIVE_REQUIRE_CHROMIUM=1 (set by .ci/run), where they fail instead: CI must not pass by
skipping. Screenshots of each page go to the test's tmp folder and to bench/screenshots/.
"""

from __future__ import annotations

import os
import shutil
import socket
import urllib.request
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image
from tomolive.core.synth import synthesize
from tomolive.core.volume import write_mrc

from .daemon_harness import Daemon, wait_until

# Synthetic tomograms that the shipped default model (served when models/ is empty) finds
# particles and filaments in, in about a second each on a CPU: the page has something to show.
SHAPE_ZYX = (32, 128, 128)
VOXEL_A = 10.0

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

REQUIRE_ENV = "TOMOLIVE_REQUIRE_CHROMIUM"
SCREENSHOTS = Path(__file__).resolve().parent.parent / "bench" / "screenshots"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def _browser_paths() -> tuple[str | None, str | None]:
    browser = next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)
    return browser, shutil.which("chromedriver")


@pytest.fixture
def browser(tmp_path):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as error:
        selenium_missing = str(error)
    else:
        selenium_missing = ""
    binary, driver_path = _browser_paths()
    missing = selenium_missing or ("" if binary and driver_path else
                                   "chromium or chromedriver not installed "
                                   "(scripts/install-chromium.sh)")
    if missing:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {missing}")
        pytest.skip(missing)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    # The driver given outright: selenium must never try to download one (CI is offline).
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _screenshot(driver, tmp_path: Path, name: str) -> Path:
    """Full-page screenshot into the tmp folder, copied to bench/screenshots/."""
    driver.set_window_size(1400, 1000)  # measure the page, not the previous window
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(max(1000, int(height) + 200), 5000))
    path = tmp_path / f"{name}.png"
    assert driver.save_screenshot(str(path)), name
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, SCREENSHOTS / path.name)
    return path


def _drop_tomogram(d: Daemon, stem: str, seed: int) -> None:
    """Write a synthetic tomogram beside the watched folder, then rename it in (whole)."""
    staging = d.root / f".{stem}.staging.mrc"
    write_mrc(staging, synthesize(SHAPE_ZYX, VOXEL_A, seed).tomogram, VOXEL_A)
    os.rename(staging, d.incoming / f"{stem}.mrc")


def _image_loaded(driver, css: str) -> bool:
    return bool(driver.execute_script(
        "const img = document.querySelector(arguments[0]);"
        "return img !== null && img.complete && img.naturalWidth > 0;", css))


# Per frame of the sweep canvas: how many pixels carry a colour (r, g, b not all equal).
_COLOURED_PIXELS_JS = """
const canvas = document.getElementById('sweep-canvas');
canvas.dataset.paused = '1';
const counts = [];
for (let f = 0; f < +canvas.dataset.frames; f++) {
  canvas.showFrame(f);
  const d = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) if (d[i] !== d[i + 1] || d[i] !== d[i + 2]) n++;
  counts.push(n);
}
return counts;
"""


def _assert_toggles_choose_the_painted_classes(browser, wait) -> None:
    """The tomogram page repaints the sweep with only the ticked classes: all ticked, some
    pixels are coloured; none ticked, none are (the gray planes alone)."""
    from selenium.webdriver.common.by import By

    wait.until(lambda b: b.find_element(By.ID, "sweep-canvas").get_attribute("data-ready"))
    assert browser.find_element(By.ID, "sweep-canvas").is_displayed()
    coloured = browser.execute_script(_COLOURED_PIXELS_JS)
    assert sum(coloured) > 0, coloured
    for box in browser.find_elements(By.CSS_SELECTOR, ".class-toggle"):
        box.click()  # untick every class
    assert sum(browser.execute_script(_COLOURED_PIXELS_JS)) == 0
    for box in browser.find_elements(By.CSS_SELECTOR, ".class-toggle"):
        box.click()
    assert browser.execute_script(_COLOURED_PIXELS_JS) == coloured


def test_session_page_in_a_browser(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = Daemon(tmp_path)
    _drop_tomogram(d, "TS_01", seed=3)
    d.start()
    try:
        url = d.metrics_url()
        d.wait_for_summary("TS_01")
        browser.get(url + "/")
        wait = WebDriverWait(browser, 120, poll_frequency=0.2)

        # The first tomogram: its row, thumbnail and class counts from its summary.
        row = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, 'tr[data-rel="TS_01"]'))
        wait.until(lambda b: _image_loaded(b, 'tr[data-rel="TS_01"] img.thumb'))
        summary = d.summary("TS_01")
        counts = row.find_element(By.CSS_SELECTOR, ".counts").text
        for name, n in summary["counts"]["particles"].items():
            assert f"{name} {n}" in counts, counts
        for name, n in summary["counts"]["filaments"].items():
            assert f"{name} {n}" in counts, counts
        assert summary["model"]["name"] in row.text
        assert sum(summary["counts"]["particles"].values()) > 0, summary["counts"]
        _screenshot(browser, tmp_path, "session_one")

        # A second one finishes: the open page shows it without being reloaded by the test.
        _drop_tomogram(d, "TS_02", seed=4)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, 'tr[data-rel="TS_02"]'))
        rows = browser.find_elements(By.CSS_SELECTOR, "tr.tomogram")
        assert [r.get_attribute("data-rel") for r in rows] == ["TS_02", "TS_01"]  # newest first
        assert browser.find_element(By.ID, "total").text == "2"

        # One parked mid-inference (a stage hold): shown as running, with host and device.
        d.hold("TS_03", "inference")
        _drop_tomogram(d, "TS_03", seed=5)
        d.wait_held("TS_03")
        running = wait.until(lambda b: [e for e in b.find_elements(By.CSS_SELECTOR,
                                                                   "#running tr")
                                        if "TS_03" in e.text])
        assert "cpu" in running[0].text and socket.gethostname() in running[0].text
        _screenshot(browser, tmp_path, "session_running")
        d.release("TS_03")
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, 'tr[data-rel="TS_03"]'))
        assert not browser.find_elements(By.CSS_SELECTOR, "#running")

        # A corrupt file: its one-line reason appears on the page.
        (d.incoming / "broken.mrc").write_text("this is not a tomogram\n" * 100)
        reason = wait.until(lambda b: [e for e in b.find_elements(By.CSS_SELECTOR,
                                                                  "#failures td.reason")
                                       if "not an MRC file" in e.text])
        assert "broken.mrc" in reason[0].text
        for stem in ("TS_02", "TS_03"):
            wait_until(lambda s=stem: _image_loaded(browser, f'tr[data-rel="{s}"] img.thumb'),
                       30, f"the thumbnail of {stem}")
        _screenshot(browser, tmp_path, "session_updated")

        # The tomogram page: the animation loads, and it is one (more than one frame).
        browser.find_element(By.CSS_SELECTOR, 'tr[data-rel="TS_01"] a.stem').click()
        wait.until(lambda b: _image_loaded(b, "#sweep"))
        sweep_url = browser.find_element(By.ID, "sweep").get_attribute("src")
        with urllib.request.urlopen(sweep_url, timeout=10) as response:
            sweep = Image.open(BytesIO(response.read()))
        assert sweep.is_animated and sweep.n_frames > 1
        assert _image_loaded(browser, "#preview")
        links = {a.text for a in browser.find_elements(By.CSS_SELECTOR, "#files a")}
        assert set(summary["files"]) <= links
        table = browser.find_elements(By.CSS_SELECTOR, "#particles tr[data-class]")
        n_particles = sum(summary["counts"]["particles"].values())
        assert len(table) == min(n_particles, 500)
        _assert_toggles_choose_the_painted_classes(browser, wait)
        _screenshot(browser, tmp_path, "tomogram")
        if table:  # a class's box hides its rows
            name = table[0].get_attribute("data-class")
            browser.find_element(By.CSS_SELECTOR, f'.class-toggle[data-class="{name}"]').click()
            assert not [r for r in table if r.get_attribute("data-class") == name
                        and r.is_displayed()]

        # The static copy in the output folder opens from disk, with its thumbnails.
        browser.get((d.outputs / "index.html").as_uri())
        rels = [r.get_attribute("data-rel")
                for r in browser.find_elements(By.CSS_SELECTOR, "tr.tomogram")]
        assert rels == ["TS_03", "TS_02", "TS_01"]
        wait.until(lambda b: all(_image_loaded(b, f'tr[data-rel="{rel}"] img.thumb')
                                 for rel in rels))
        _screenshot(browser, tmp_path, "static_index")
        browser.find_element(By.CSS_SELECTOR, 'tr[data-rel="TS_01"] a.stem').click()
        wait.until(lambda b: _image_loaded(b, "#sweep"))
    finally:
        d.stop()
