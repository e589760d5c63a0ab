"""Drives the business dashboard in headless Chromium through ChromeDriver
(Selenium), for broker/tests/dashboard.rs.

Usage: dashboard.py <base url> <business token> <artefact dir>

1. Opens /dashboard, signs in with a wrong token (the refusal is kept),
   then with the business's token, and waits until the page says ready.
2. Writes every shown figure (elements with data-figure: their text) and
   the feed's event sequences to <dir>/figures.json, with a screenshot.
3. Waits (bounded) for <dir>/next_event, a sequence the test made happen
   after that, until the feed shows it live; writes <dir>/live.json and a
   second screenshot.
"""

import json
import os
import shutil
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

base, token, out = sys.argv[1:4]


def write(name, value):
    tmp = os.path.join(out, name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, os.path.join(out, name))


options = Options()
options.binary_location = shutil.which("chromium")
for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
            "--disable-gpu", "--window-size=1400,1000"):
    options.add_argument(arg)
driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
driver.set_page_load_timeout(30)
try:
    wait = WebDriverWait(driver, 20)
    driver.get(base + "/dashboard")
    wait.until(lambda d: d.find_element(By.ID, "login").is_displayed())
    driver.find_element(By.ID, "token").send_keys("not-a-token")
    driver.find_element(By.ID, "signin").click()
    wait.until(lambda d: d.find_element(By.ID, "error").text != "")
    refused = driver.find_element(By.ID, "error").text
    driver.save_screenshot(os.path.join(out, "dashboard-sign-in.png"))

    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.ID, "signin").click()
    wait.until(lambda d: d.find_element(By.ID, "state").get_attribute("textContent") == "ready")

    # Read in one script each: the page redraws every second, so elements
    # found one call earlier may be gone.
    def shown():
        return dict(driver.execute_script(
            "return Array.from(document.querySelectorAll('[data-figure]'))"
            ".map(e => [e.dataset.figure, (e.innerText ?? e.textContent).trim()])"))

    def feed():
        return driver.execute_script(
            "return Array.from(document.querySelectorAll('#feed li'))"
            ".map(e => Number(e.dataset.event))")

    driver.save_screenshot(os.path.join(out, "dashboard.png"))
    write("figures.json", {"refused": refused, "figures": shown(), "feed": feed()})

    deadline = time.time() + 30
    path = os.path.join(out, "next_event")
    while not os.path.exists(path):
        if time.time() > deadline:
            raise SystemExit("the test never made the next event")
        time.sleep(0.05)
    seq = int(open(path).read())
    WebDriverWait(driver, 20).until(lambda d: seq in feed())
    driver.save_screenshot(os.path.join(out, "dashboard-live.png"))
    write("live.json", {"figures": shown(), "feed": feed()})
finally:
    driver.quit()
