"""The page in a real browser: Debian's headless Chromium, driven by Selenium through chromedriver.

`make test` installs the two Debian packages (chromium, chromium-driver) when they are missing; nothing is
downloaded by the browser or by Selenium (its driver manager is switched off and the paths are given).
"""

import base64
import io
import json
import os
import re
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Flags for a closed network: no background connections, no sync, no component updates (each of them
# otherwise retries refused connections for the whole run).
FLAGS = (
    "--headless=new --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking"
    " --disable-component-update --disable-sync --disable-dev-shm-usage --window-size=1200,1400"
).split()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: `make test` installs them "
            "(apt-get install chromium chromium-driver)"
        )
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never try to download a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def wait(driver, condition, timeout=120, what="the page"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        lambda d: condition(d), message=f"{what} did not happen in {timeout} s"
    )


def fill_form(driver, model, **fields):
    """Pick the model (which refills the class and sampler lists), then set each field by element id."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"), what="the model list")
    Select(driver.find_element(By.ID, "model")).select_by_visible_text(model)
    for name, value in fields.items():
        element = driver.find_element(By.ID, name)
        if element.tag_name == "select":
            Select(element).select_by_visible_text(str(value))
        else:
            element.clear()
            element.send_keys(str(value))


def record_status(driver):
    """Keep every text the status line shows (a MutationObserver), so the test sees the live progress."""
    driver.execute_script(
        "window.seen = []; new MutationObserver(() => window.seen.push(document.getElementById('status')"
        ".textContent)).observe(document.getElementById('status'), {childList: true, characterData: true,"
        " subtree: true});"
    )


def shown_image(driver):
    """The bytes of the image the page shows (read back from its blob: URL inside the page)."""
    encoded = driver.execute_async_script(
        "const done = arguments[0]; fetch(document.getElementById('grid').src).then((r) => r.arrayBuffer())"
        ".then((b) => { let s = ''; new Uint8Array(b).forEach((x) => { s += String.fromCharCode(x); });"
        " done(btoa(s)); });"
    )
    return base64.b64decode(encoded)


def test_pick_a_model_and_a_class_generate_and_the_image_appears(browser, server, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(server + "/")
    request = {"sampler": "ddim", "steps": 40, "seed": 7}
    fill_form(browser, "runs/ddpm16.pt", **{"class": "class_1", "n": 8, **request})
    record_status(browser)
    browser.find_element(By.ID, "go").click()
    wait(
        browser,
        lambda d: d.execute_script(
            "const g = document.getElementById('grid'); return g.complete && g.naturalWidth > 0;"
        ),
        what="the image",
    )
    browser.save_screenshot(str(tmp_path / "page.png"))
    assert Image.open(tmp_path / "page.png").size[0] > 0
    assert browser.find_element(By.ID, "status").text == "done"
    assert browser.find_element(By.ID, "error").text == ""
    progress = browser.find_element(By.ID, "progress")
    assert (progress.get_attribute("value"), progress.get_attribute("max")) == ("8", "8")
    seen = browser.execute_script("return window.seen;")
    # Live progress: the job's states and image counts as the page polled them, ending in done.
    line = r"(queued|running): (\d) of 8 images(?:, (\d+) network evaluations)? \("
    polled = [re.match(line, text) for text in seen[:-1]]
    assert all(polled) and seen[-1] == "done", seen
    counts = [(int(match[2]), int(match[3] or 0)) for match in polled]  # (images, network evaluations)
    assert "running" in {match[1] for match in polled} and counts == sorted(counts), seen
    # The image on the page is exactly what the API gives for the same request (the seed fixes the noise).
    body = {"model": "runs/ddpm16.pt", "class": "class_1", "n": 8, "guidance_scale": 3, **request}
    reply = httpx.post(server + "/generate", json=body, params={"format": "grid"}, timeout=120)
    assert reply.status_code == 200, reply.text
    shown = shown_image(browser)
    assert shown == reply.content
    assert Image.open(io.BytesIO(shown)).size[0] > 16  # a grid of several 16 px images


def test_a_refused_request_shows_the_servers_message(browser, server):
    from selenium.webdriver.common.by import By

    browser.get(server + "/")
    fill_form(browser, "runs/flow.pt", n=2, steps=100000)
    browser.find_element(By.ID, "go").click()
    error = wait(browser, lambda d: d.find_element(By.ID, "error").text, what="the error message")
    assert error.startswith("steps must be between 1 and"), error
    assert browser.find_element(By.ID, "go").is_enabled()  # the form can be used again


def test_controlnet_mask_upload_shows_the_mask_the_image_and_its_dice(browser, kinds_server, tmp_path):
    from selenium.webdriver.common.by import By

    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 3:10] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    browser.get(kinds_server + "/")
    fill_form(browser, "controlnet/checkpoint_best.pt", n=2, steps=2, seed=3, conditioning=1.5)
    assert browser.find_element(By.ID, "mask-fields").is_displayed()  # shown for a ControlNet only
    browser.find_element(By.ID, "mask").send_keys(str(tmp_path / "mask.png"))
    wait(browser, lambda d: d.find_element(By.ID, "mask-preview").is_displayed(), what="the mask preview")
    browser.find_element(By.ID, "go").click()
    scores = wait(browser, lambda d: d.find_element(By.ID, "scores").text, what="the Dice score")
    browser.save_screenshot(str(tmp_path / "controlnet.png"))
    # The page shows the Dice that the API gives for the same mask and settings.
    encoded = base64.b64encode((tmp_path / "mask.png").read_bytes()).decode()
    body = {"model": "controlnet/checkpoint_best.pt", "n": 2, "steps": 2, "seed": 3, "guidance_scale": 3}
    body.update(mask=encoded, conditioning_scale=1.5)
    reply = httpx.post(kinds_server + "/generate", json=body, params={"format": "grid"}, timeout=120)
    assert reply.status_code == 200, reply.text
    expected = json.loads(reply.headers["X-Scores"])
    assert scores.startswith(f"Dice with the mask: mean {expected['mean_dice']:.3f} ("), scores
    assert shown_image(browser) == reply.content  # the grid: the mask beside each generated image
    fill_form(browser, "ddpm.pt")
    assert not browser.find_element(By.ID, "mask-fields").is_displayed()
