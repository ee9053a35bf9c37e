"""report.html in a real browser: headless Chromium driven by Selenium through Debian's chromedriver.

The run folders are written by tests/report_samples.py and turned into report.json's dict by server.report, as
``fedsr report`` does; the page is then opened from disk. Skipped only where Chromium or its driver is not
installed (the skip reason gives the command).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from report_samples import sample_site_names, write_sample_run
from server.report import ReportInputError, build_report
from server.report_html import write_report_html

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
INSTALL = "apt-get install -y chromium chromium-driver"
#: A hospital's site name with markup, quotes, an ampersand and matplotlib math in it (no "/": it names a file).
HTML_NAME = 'site-<b>"A&E" <img src="nowhere.png" onerror="alert(1)"> $x^2$'
SECTIONS = ["header", "notes", "cross-site", "gain", "rounds", "leave-one-out", "consistency", "previews", "sites"]
HEATMAPS = ["psnr", "ssim", "nrmse", "hfen", "psnr-gain", "ssim-gain"]


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module, 1500 CSS pixels wide, keeping the console log."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(f"needs Chromium and its driver (Debian: `{INSTALL}`)")
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The driver's path is given, so Selenium's driver manager never looks for (or downloads) one.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def open_page(driver: webdriver.Chrome, path: Path) -> None:
    """Load ``path`` and wait until its load event has finished (so navigation timing is complete)."""
    driver.get(path.as_uri())
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return performance.timing.loadEventEnd > 0"))


def assert_clean_and_loaded(driver: webdriver.Chrome) -> list[dict]:
    """No SEVERE console entry, and every image decoded and drawn with a size; returns the images' facts."""
    severe = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == []
    images = driver.execute_script(
        "return [...document.images].map(i => ({alt: i.alt, complete: i.complete, natural: i.naturalWidth, "
        "width: i.getBoundingClientRect().width, height: i.getBoundingClientRect().height}))")
    assert images, "the page has no image"
    broken = [i for i in images if not (i["complete"] and i["natural"] > 0 and i["width"] > 0 and i["height"] > 0)]
    assert broken == []
    return images


def save_full_screenshot(driver: webdriver.Chrome, path: Path) -> Path:
    """The whole page (not just the window) as a PNG, through the DevTools protocol."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def numbers(text: str) -> list[float]:
    """The numbers written in ``text``, in order."""
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", text)]


def rename_site(run_dir: Path, old: str, new: str) -> None:
    """Give site ``old`` the name ``new`` everywhere the run folder names it (as its site.toml would have)."""
    encoded = json.dumps(new)[1:-1]
    for name in ("cross_site.json", "metrics.jsonl"):
        path = run_dir / name
        path.write_text(path.read_text(encoding="utf-8").replace(old, encoded), encoding="utf-8")
    with np.load(run_dir / "previews" / f"{old}.npz") as preview:
        arrays = {key.replace(old, new): preview[key] for key in preview.files}
    np.savez(run_dir / "previews" / f"{new}.npz", **arrays)
    (run_dir / "previews" / f"{old}.npz").unlink()


def withhold_previews(run_dir: Path, site: str) -> None:
    """Make ``site`` one whose site.toml keeps its images: no preview file, ``shares_previews`` false."""
    path = run_dir / "cross_site.json"
    stored = json.loads(path.read_text(encoding="utf-8"))
    stored["sites"][site]["shares_previews"] = False
    path.write_text(json.dumps(stored), encoding="utf-8")
    (run_dir / "previews" / f"{site}.npz").unlink()


def test_report_page_shows_every_section_and_escapes_site_names(browser, tmp_path):
    run_dir = write_sample_run(tmp_path / "run", n_sites=3, unshared_site=1, short_site=2)
    first, private, short = sample_site_names(3)
    withhold_previews(run_dir, private)
    rename_site(run_dir, first, HTML_NAME)
    report = build_report(run_dir)
    page = write_report_html(report, run_dir)
    assert page == run_dir / "report.html"

    open_page(browser, page)
    images = assert_clean_and_loaded(browser)
    screenshot = save_full_screenshot(browser, tmp_path / "report.png")
    print(f"full-page screenshot: {screenshot}")

    ids = browser.execute_script("return [...document.querySelectorAll('header[id], section[id]')].map(e => e.id)")
    assert ids == SECTIONS
    alts = [i["alt"] for i in images]
    for metric in HEATMAPS:
        assert f"{metric} heatmap" in alts
    assert {"PSNR gain bars", "dc-error bars", "hf-excess bars"} <= set(alts)
    experiments = {row["experiment"] for row in report["rounds"]}
    assert len(experiments) == 4  # the federation and one leave-one-out federation per site
    assert {f"validation curves of {experiment}" for experiment in experiments} <= set(alts)

    # Crops: every model scored at a consenting site, none of the site that keeps its images.
    for site in (HTML_NAME, short):
        for model in report["previews"][site]["models"]:
            assert f"{site}: SR of {model}" in alts
    assert not [alt for alt in alts if alt.startswith(f"{private}:")]
    absent = browser.find_elements(By.CSS_SELECTOR, "#previews .preview-absent")
    assert [e.text for e in absent] == [f"{private}: its images stay at the site."]

    # The markup in the site name is text: no element came from it, and it reads as written.
    assert browser.find_elements(By.CSS_SELECTOR, 'img[src="nowhere.png"]') == []
    assert [b for b in browser.find_elements(By.TAG_NAME, "b") if '"A&E"' in b.text] == []
    site_cells = [row.find_element(By.TAG_NAME, "td").text for row in
                  browser.find_elements(By.CSS_SELECTOR, "#sites tbody tr")]
    assert site_cells == [HTML_NAME, private, short]
    assert HTML_NAME in browser.find_element(By.ID, "header").text

    # The tables hold the report's numbers: a model's cell, and "–" where a model stays at its own site.
    browser.execute_script("document.querySelectorAll('details').forEach(d => d.open = true)")
    psnr = browser.find_element(By.CSS_SELECTOR, "#cross-site details table")
    rows = {r.find_element(By.TAG_NAME, "td").text: [c.text for c in r.find_elements(By.TAG_NAME, "td")[1:]]
            for r in psnr.find_elements(By.CSS_SELECTOR, "tbody tr")}
    global_at_first = report["cross_site"]["psnr"]["global"][HTML_NAME]
    assert numbers(rows["global"][0]) == pytest.approx([global_at_first["mean"], *global_at_first["ci95"]], abs=0.006)
    assert rows["global"][2].endswith(" (n=2, no interval)")
    assert numbers(rows["global"][2])[0] == pytest.approx(report["cross_site"]["psnr"]["global"][short]["mean"],
                                                          abs=0.006)
    assert rows[f"local:{private}"] == ["–", rows[f"local:{private}"][1], "–"]

    # Leave-one-out, PSNR first: one row per held-out site, with the global model's score there.
    loo = browser.find_element(By.CSS_SELECTOR, "#leave-one-out table")
    assert browser.find_element(By.CSS_SELECTOR, "#leave-one-out h3").text.startswith("PSNR")
    loo_rows = [[c.text for c in r.find_elements(By.TAG_NAME, "td")] for r in loo.find_elements(By.CSS_SELECTOR,
                                                                                                 "tbody tr")]
    assert [r[0] for r in loo_rows] == [HTML_NAME, private, short]
    assert loo_rows[0][2] == rows["global"][0]


def test_ten_site_report_is_small_and_loads_fast(browser, tmp_path):
    run_dir = write_sample_run(tmp_path / "run", n_sites=10, scans_per_site=3)
    page = write_report_html(build_report(run_dir), run_dir)
    size = page.stat().st_size
    print(f"10-site report.html: {size / 1e6:.2f} MB")
    assert size < 5_000_000

    open_page(browser, page)
    load_ms = browser.execute_script("const t = performance.timing; return t.loadEventEnd - t.navigationStart")
    print(f"load: {load_ms} ms")
    assert load_ms < 2000
    assert_clean_and_loaded(browser)


def test_run_stopped_before_cross_site_scoring_still_shows_its_rounds(browser, tmp_path):
    run_dir = write_sample_run(tmp_path / "run", n_sites=2, holdout=False, previews=False)
    (run_dir / "cross_site.json").unlink()
    report = build_report(run_dir)
    open_page(browser, write_report_html(report, run_dir))
    images = assert_clean_and_loaded(browser)
    experiments = {row["experiment"] for row in report["rounds"]}
    assert [i["alt"] for i in images] == [f"validation curves of {e}" for e in experiments]
    assert "No model was scored on test scans" in browser.find_element(By.ID, "cross-site").text


def test_a_preview_without_its_hr_crop_names_the_file(tmp_path):
    run_dir = write_sample_run(tmp_path / "run", n_sites=2, holdout=False)
    site = sample_site_names(2)[1]
    path = run_dir / "previews" / f"{site}.npz"
    with np.load(path) as preview:
        arrays = {key: preview[key] for key in preview.files if key != "hr"}
    np.savez(path, **arrays)
    with pytest.raises(ReportInputError, match=f"{re.escape(str(path))}: the preview of {site} lacks hr"):
        write_report_html(build_report(run_dir), run_dir)
    assert not (run_dir / "report.html").exists()
