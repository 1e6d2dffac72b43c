"""Headless Debian Chromium driven by Debian's chromedriver (selenium), for the browser tests.

The flags keep Chromium off the network (this machine has none but loopback) and out of any
profile of the user's; nothing is downloaded (the driver path is given, so selenium's own driver
manager never runs).
"""

import shutil
import tempfile
from contextlib import contextmanager

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage")


@contextmanager
def chromium(width: int = 1400, height: int = 1000):
    """A webdriver.Chrome on /usr/bin/chromium with a fresh, throwaway profile."""
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        raise RuntimeError("the browser tests need Debian's chromium and chromium-driver: "
                           "apt-get install chromium chromium-driver (make test installs them)")
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    try:
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)
