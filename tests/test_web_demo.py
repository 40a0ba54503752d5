"""The web demo in a real headless Chromium (Debian's chromium + chromium-driver, via Selenium):
upload, vocabulary, overlay and legend; a text file gives a message and the page keeps working.
Under CI=true a missing browser is a failure, not a skip."""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "demo" / "samples" / "beach.jpg"
WAIT_S = 120  # bound of every wait on the page or the server


def browser_or_skip():
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium")
    if missing:
        message = f"web demo test needs {', '.join(missing)} (tools/install.sh installs them)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"web demo did not listen on {port} within {WAIT_S} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    browser_or_skip()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "GRADIO_ANALYTICS_ENABLED": "False"}
    # no --config-file: the quick-start model if `make demo` trained it, else tiny + random weights (banner)
    proc = subprocess.Popen([sys.executable, str(REPO / "demo" / "app.py"), "--port", str(port)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def segment(driver, file: Path, vocabulary: str):
    """Upload `file`, type `vocabulary`, press Segment; returns the status text once the run ends."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, WAIT_S)
    upload = driver.find_element(By.CSS_SELECTOR, "#image input[type=file]")
    upload.send_keys(str(file))
    wait.until(lambda d: file.stem in d.find_element(By.ID, "image").text)
    wait.until(lambda d: field(d, "status") == "")  # a new image clears the last message
    box = driver.find_element(By.CSS_SELECTOR, "#vocab textarea")
    box.clear()
    box.send_keys(vocabulary)
    driver.find_element(By.ID, "run").click()
    return wait.until(lambda d: _finished(field(d, "status")))


def field(driver, elem_id: str) -> str:
    """The text shown in the plain-text box `elem_id` (status, legend)."""
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea").get_attribute("value")


def _finished(status: str):
    """The status text once a run has finished (falsy while it runs)."""
    return status if status.startswith(("Done", "Error")) else None


def clear_upload(driver):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.CSS_SELECTOR, "#image button[aria-label='Clear']").click()
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))


def test_model_choices_without_config(tmp_path, monkeypatch):
    """No --config-file: the quick-start model once `make demo` trained it, else random weights (banner)."""
    from catseg.app import web as web_demo

    config, weights = tmp_path / "quickstart.yaml", tmp_path / "model_final.pth"
    monkeypatch.setattr(web_demo, "QUICKSTART", (config, weights))
    models, random_weights = web_demo.model_choices([], [])
    assert random_weights and list(models.values()) == [(str(web_demo.TINY), "")]
    weights.write_bytes(b"")
    models, random_weights = web_demo.model_choices([], [])
    assert not random_weights and list(models.values()) == [(str(config), str(weights))]
    models, _ = web_demo.model_choices(["a.yaml", "b.yaml"], ["a.pth"])
    assert list(models.values()) == [("a.yaml", "a.pth"), ("b.yaml", "")]


def test_page_upload_vocabulary_overlay_legend_and_error(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server)
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_elements(By.ID, "run"))
    from catseg.app.web import QUICKSTART
    banner = browser.find_elements(By.ID, "banner")
    assert bool(banner) == (not QUICKSTART[1].is_file())
    assert not banner or "Random weights" in banner[0].text
    status = segment(browser, SAMPLE, "sky; sand; sea")
    assert status.startswith("Done"), status
    overlay = WebDriverWait(browser, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#overlay img"))
    assert overlay[0].get_attribute("src")
    legend = field(browser, "legend")
    listed = legend.split(":", 1)[1].split(";")
    assert listed and all(name.strip() in ("sky", "sand", "sea") for name in listed), legend
    rows = browser.find_element(By.ID, "table").text
    assert all(name.strip() in rows for name in listed)
    screenshot = tmp_path / "web_demo.png"
    browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 0

    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    clear_upload(browser)
    status = segment(browser, text_file, "sky; sand")
    assert "Error" in status and "not an image" in status, status

    clear_upload(browser)
    status = segment(browser, SAMPLE, "sky; water")  # the server still serves
    assert status.startswith("Done"), status


HOSTILE = "<img src=x onerror=alert(1)>; <b>sky</b>; a*b*c; sky_blue_water_"


def test_class_names_are_text_never_markup(server, browser, tmp_path):
    """A vocabulary of HTML and Markdown shows as typed in the legend, table, status line and
    downloads; no element is injected and no script runs."""
    import json
    import urllib.request

    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server)
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_elements(By.ID, "run"))
    names = [n.strip() for n in HOSTILE.split(";")]
    status = segment(browser, SAMPLE, HOSTILE)
    assert status.startswith("Done") and "4 classes" in status, status
    legend = field(browser, "legend")
    listed = [n.strip() for n in legend.split(":", 1)[1].split(";")]
    assert listed and set(listed) <= set(names), legend  # literally, with < > * _ intact
    table = WebDriverWait(browser, WAIT_S).until(lambda d: d.find_element(By.ID, "table").text)
    assert all(name in table for name in listed), table
    for area in ("legend", "table", "status"):
        root = browser.find_element(By.ID, area)
        assert not root.find_elements(By.CSS_SELECTOR, "img[src='x'], b, em, strong, i"), area
    assert not browser.find_elements(By.CSS_SELECTOR, "img[src='x']")
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text
    links = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "#downloads a")]
    json_link = next(h for h in links if h and h.split("?")[0].endswith(".json"))
    assert json_link.startswith(server)
    with urllib.request.urlopen(json_link, timeout=WAIT_S) as response:
        record = json.loads(response.read().decode("utf-8"))
    assert [c["name"] for c in record["classes"]] == names

    marked_up = tmp_path / "<img src=y onerror=alert(2)>.png"  # the status line names the file as typed
    marked_up.write_text("not an image")
    clear_upload(browser)
    status = segment(browser, marked_up, "sky")
    # Gradio drops < > from uploaded file names; the rest shows as text
    assert status.startswith("Error: img src=y onerror=alert(2).png: not an image"), status
    assert not browser.find_elements(By.CSS_SELECTOR, "img[src='y']")
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text


def test_oversized_upload_gives_a_message_and_the_page_keeps_serving(server, browser, tmp_path):
    """Past --max-upload-mb (default 20) the page says so; the next image is segmented."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server)
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_elements(By.ID, "run"))
    huge = tmp_path / "huge.png"
    huge.write_bytes(os.urandom(21 * 2**20))
    browser.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(huge))
    WebDriverWait(browser, WAIT_S).until(
        lambda d: 'exceed the maximum allowed size of 20.0 Mb: "huge.png"' in d.find_element(By.TAG_NAME, "body").text)
    assert segment(browser, SAMPLE, "sky; sand").startswith("Done")
