"""Screenshots of the edit debugger (/ui) for docs/ui/: the shipped easy-vqa models, real edits, tuned.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/ui_screenshots.py [--out docs/ui]

Needs Debian's chromium + chromium-driver and selenium (the dev extra). Writes edits.png, probe.png,
scope-map.png and audit.png (the Audit view of a 16-edit easy-vqa eval run). The browser tests
(tests/test_ui.py) check the same views on the random tiny model; this script only takes pictures of what
a user would see with the embedded default models.
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import tempfile
from pathlib import Path

import httpx
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from esg_memory.demo import demo_pictures
from esg_memory.eval import EvalConfig, run_eval
from esg_memory.loading import DEFAULT_ENCODER, DEFAULT_MODEL
from esg_memory.serve import create_app, running_server
from esg_memory.serve.cli import open_model

TOKEN = "screenshots-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# (colour, shape, question, new answer): three corrections a user might send
EDITS = (
    ("red", "circle", "what shape is in the image?", "oval"),
    ("blue", "rectangle", "what color is the shape?", "navy"),
    ("green", "triangle", "what shape is in the image?", "pyramid"),
)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "ui"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="esg-ui-shots-"))
    run_eval(EvalConfig(kind="easyvqa", edits=16, seed=0), tmp / "eval", progress=False)  # for the Audit view
    model = open_model(DEFAULT_MODEL, DEFAULT_ENCODER, tmp / "m")
    app = create_app(model, tmp / "m", token=TOKEN, eval_dir=tmp / "eval")
    with running_server(app, "127.0.0.1", 0) as url, httpx.Client(base_url=url, timeout=600) as c:
        pictures = demo_pictures()  # held-out easy-vqa drawings by subject
        for colour, shape, question, answer in EDITS:
            image = png(pictures[f"{colour} {shape}"][0])
            body = {"question": question, "answer": answer, "tune": "sync",
                    "image": "data:image/png;base64," + base64.b64encode(image).decode()}
            r = c.post("/edits", headers=AUTH, json=body)
            r.raise_for_status()
        probe_file = tmp / "probe.png"  # another drawing of the first edit's subject
        probe_file.write_bytes(png(pictures["red circle"][1]))

        opts = webdriver.ChromeOptions()
        opts.binary_location = "/usr/bin/chromium"
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,900"):
            opts.add_argument(arg)
        d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
        wait = WebDriverWait(d, 120, poll_frequency=0.2)

        def text(css: str) -> str:
            return d.execute_script(
                "const e = document.querySelector(arguments[0]); return e ? e.textContent : '';", css)

        try:
            d.get(url + "/ui")
            wait.until(lambda _: text("#count").endswith(" edits"))
            d.find_element(By.CSS_SELECTOR, "#token").send_keys(TOKEN)
            d.find_element(By.CSS_SELECTOR, "#token-set").click()
            d.find_element(By.CSS_SELECTOR, '#edit-table tbody tr[data-id="0"]').click()
            wait.until(lambda _: text("#detail h3") == "Edit 0")
            d.save_screenshot(str(out / "edits.png"))

            d.find_element(By.CSS_SELECTOR, "#tab-probe").click()
            d.find_element(By.CSS_SELECTOR, "#probe-image").send_keys(str(probe_file))
            d.find_element(By.CSS_SELECTOR, "#probe-question").send_keys("which shape is shown?")
            d.find_element(By.CSS_SELECTOR, "#probe-submit").click()
            wait.until(lambda _: text("#probe-routed"))
            d.save_screenshot(str(out / "probe.png"))

            d.find_element(By.CSS_SELECTOR, "#tab-map").click()
            wait.until(lambda _: d.find_elements(By.CSS_SELECTOR, "#map g.probe"))
            d.save_screenshot(str(out / "scope-map.png"))

            d.find_element(By.CSS_SELECTOR, "#tab-audit").click()
            wait.until(lambda _: d.find_elements(By.CSS_SELECTOR, "#audit-table tr.audit-row"))
            d.find_element(By.CSS_SELECTOR, "#audit-table tr.audit-row").click()
            wait.until(lambda _: d.find_elements(By.CSS_SELECTOR, "#audit-table tr.audit-probes td table"))
            d.save_screenshot(str(out / "audit.png"))
        finally:
            d.quit()
    logging.getLogger("ui_screenshots").warning("wrote edits.png, probe.png, scope-map.png, audit.png to %s",
                                                out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
