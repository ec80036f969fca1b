"""Drive the web page in headless Chromium: upload a photo, wait for the answer, screenshot it.

    python tools/page_screenshot.py --model OUT/model --photo PHOTO --out docs/serve.png [--use MODEL]

Uses Debian's ``chromium`` and ``chromium-driver`` packages (apt-get install chromium chromium-driver);
Selenium drives them, no browser download. The web test uses ``upload_and_read`` too.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
from pathlib import Path

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVER = ("chromedriver",)


def find_browser() -> tuple[str, str] | None:
    """(browser, driver) executables, or None when they are not installed."""
    browser = next((p for p in map(shutil.which, CHROMIUM) if p), None)
    driver = next((p for p in map(shutil.which, DRIVER) if p), None)
    return (browser, driver) if browser and driver else None


def upload_and_read(url: str, photo: str | Path, screenshot: str | Path | None = None,
                    timeout: float = 120) -> dict:
    """Open ``url``, upload ``photo`` through the file input, wait for the result; returns what the
    page shows: title, verdict, the shown probability's name and value, the class and vote table rows,
    the map's caption, the status line and the CAM image's natural size."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    found = find_browser()
    if found is None:
        raise RuntimeError("chromium and chromedriver are not installed "
                           "(apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1100,960", "--hide-scrollbars"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    try:
        driver.get(url)
        driver.find_element(By.ID, "file").send_keys(str(Path(photo).resolve()))
        wait = WebDriverWait(driver, timeout)
        wait.until(lambda d: "shown" in d.find_element(By.ID, "result").get_attribute("class")
                   or "error" in (d.find_element(By.ID, "status").get_attribute("class") or ""))
        wait.until(ec.visibility_of_element_located((By.ID, "cam")))
        image = driver.execute_script(
            "const i = document.getElementById('cam');"
            "return [i.complete, i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width];")
        shown = {
            "verdict": driver.find_element(By.ID, "verdict").text,
            "p_dog": driver.find_element(By.ID, "pdog-value").text,
            "p_name": driver.find_element(By.ID, "pdog-name").text,
            "title": driver.find_element(By.ID, "title").text,
            "classes": [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#classes tr")],
            "votes": [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#votes tr")],
            "cam_note": driver.find_element(By.ID, "camnote").text,
            "status": driver.find_element(By.ID, "status").text,
            "image_loaded": bool(image[0]) and image[1] > 0,
            "image_size": (image[1], image[2]),
            "image_displayed_width": image[3],
        }
        if screenshot:
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(screenshot))
        return shown
    finally:
        driver.quit()


def main(argv: list[str] | None = None) -> int:
    from stacking.serve import Service, create_app, make_server

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--photo", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--use", default=None)
    args = parser.parse_args(argv)
    server = make_server(create_app(Service(args.model, model=args.use)), port=0)
    threading.Thread(target=server.run, daemon=True).start()
    shown = upload_and_read(f"http://127.0.0.1:{server.effective_port}/", args.photo, args.out)
    server.close()
    print(shown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
