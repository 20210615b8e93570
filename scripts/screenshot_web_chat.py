#!/usr/bin/env python3
"""Makes docs/web_chat.png: `kiln serve` on a workspace, its chat page in headless Chromium, one short conversation.

    python scripts/screenshot_web_chat.py [--workspace /work/main/out/smol-bf16] [--out docs/web_chat.png]

Needs chromium, chromium-driver and selenium (scripts/setup.sh) and a built kiln (build/tools/kiln or $KILN_BIN).
"""
import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

REPO = Path(__file__).resolve().parents[1]
TURNS = ["What is a kiln used for?", "And how hot does it get?"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default="/work/main/out/smol-bf16")
    ap.add_argument("--out", default=str(REPO / "docs" / "web_chat.png"))
    ap.add_argument("--max-tokens", type=int, default=60)
    args = ap.parse_args()
    kiln = os.environ.get("KILN_BIN", str(REPO / "build" / "tools" / "kiln"))
    port = free_port()
    server = subprocess.Popen([kiln, "serve", args.workspace, "--port", str(port), "--model-name", "SmolLM2-135M",
                               "--ctx", "2048"], stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                if server.poll() is not None:
                    sys.exit("kiln serve exited")
                time.sleep(0.1)
        options = webdriver.ChromeOptions()
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    "--window-size=900,880", "--hide-scrollbars", "--force-device-scale-factor=1"):
            options.add_argument(arg)
        driver = webdriver.Chrome(options=options,
                                  service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver"))
        try:
            driver.get(f"http://127.0.0.1:{port}/")
            WebDriverWait(driver, 30).until(lambda d: "SmolLM2" in d.find_element(By.ID, "model").text)
            driver.execute_script(f"document.getElementById('temperature').value = 0;"
                                  f"document.getElementById('max-tokens').value = {args.max_tokens};")
            for turn in TURNS:
                box = driver.find_element(By.ID, "prompt")
                box.send_keys(turn)
                box.send_keys(Keys.ENTER)
                WebDriverWait(driver, 300).until(
                    lambda d: d.find_element(By.ID, "status").get_attribute("data-state") in ("done", "error"))
            driver.save_screenshot(args.out)
        finally:
            driver.quit()
    finally:
        server.terminate()
        server.wait()
    print(f"wrote {args.out} ({Path(args.out).stat().st_size} bytes)")


if __name__ == "__main__":
    main()
