"""The edit debugger (/ui) in a real browser: Debian's headless Chromium driven by Selenium against a real
uvicorn serving the seeded random tiny LLaVA and the tiny offline CLIP, with a few edits (tune="never").

Each view loads; a probe shows which edit fired, its candidates and the bare beside the edited answer; an
edit added and deleted through the page (with the token) changes the next probe; feedback goes through;
a question holding ``<script>`` / ``<img onerror>`` is shown as text. After every test the browser's
console holds no error and every request it made went to the server itself (CDP Network events).

Needs ``apt-get install chromium chromium-driver`` (and ``selenium``, the dev extra): without them the
tests fail, never skip. ``ESG_UI_SCREENSHOTS=DIR`` also saves each view to DIR (docs/ui comes from
scripts/ui_screenshots.py).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from types import SimpleNamespace

import fastapi  # noqa: F401  (an [all] extra: missing means failing, never skipping)
import httpx
import pytest
from _serve_fixtures import AUTH, GREEN, PURPLE, TOKEN, Q, png_bytes, running

from esg_memory.serve import create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
BLUE = png_bytes((30, 60, 220), "circle")
XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'
WAIT = 60


def wrap(serve_base):
    from esg_memory.config import EditedModelConfig
    from esg_memory.model import EditedModel

    model, processor, encoder = serve_base
    cfg = EditedModelConfig(n_paraphrases=0, n_augmented_images=0, tune="never")
    return EditedModel.wrap(model, processor, memory=None, encoder=encoder, config=cfg)


@pytest.fixture(scope="module")
def driver():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"the /ui browser tests need Chromium and its driver ({', '.join(missing)} missing): "
                    "apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    d = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    try:
        yield d
    finally:
        d.quit()


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    """A real tiny eval run's output (the Audit view's data)."""
    from _audit_fixtures import tiny_eval_run

    return tiny_eval_run(tmp_path_factory.mktemp("eval") / "run")


@pytest.fixture(scope="module")
def site(serve_base, eval_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    files = {}
    for name, data in (("purple", PURPLE), ("green", GREEN), ("blue", BLUE)):
        files[name] = root / f"{name}.png"
        files[name].write_bytes(data)
    app = create_app(wrap(serve_base), root / "m", token=TOKEN, eval_dir=eval_run)
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        ids = {}
        for name, image, answer, question in (("purple", PURPLE, "purple", Q), ("green", GREEN, "green", Q),
                                              ("xss", None, "harmless", XSS)):
            body = {"question": question, "answer": answer, "tune": "never", "metadata": {"ticket": name}}
            if image is not None:
                body["image"] = "data:image/png;base64," + base64.b64encode(image).decode()
            r = c.post("/edits", headers=AUTH, json=body)
            assert r.status_code == 201, r.text
            ids[name] = r.json()["id"]
        yield SimpleNamespace(url=url, ids=ids, files=files, client=c)


# ------------------------------------------------------------------------------------------ helpers


def wait(driver, predicate, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT, poll_frequency=0.1).until(lambda d: predicate(d), message=what)


def by_css(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def one(driver, css: str):
    found = by_css(driver, css)
    assert found, f"nothing matches {css}"
    return found[0]


def text(driver, css: str) -> str:
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;", css)


def assert_clean(driver, url: str) -> None:
    """No console error since the last call, and every request went to the server (or data:/blob:)."""
    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors
    seen = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            seen.append(msg["params"]["request"]["url"])
        assert msg["method"] != "Network.webSocketCreated", msg
    assert seen, "no request was recorded: the performance log is not on"
    foreign = [u for u in seen if not (u.startswith(url + "/") or u.startswith(("data:", "blob:")))]
    assert not foreign, foreign


def shot(driver, name: str) -> None:
    # docs/ui's pictures come from scripts/ui_screenshots.py (the shipped models, tuned edits); this keeps
    # what the random tiny model shows, for debugging a failing view
    where = os.environ.get("ESG_UI_SCREENSHOTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(where) / f"{name}.png"))


def open_page(driver, site) -> None:
    driver.get(site.url + "/ui")
    wait(driver, lambda d: (text(d, "#count") or "").endswith(f"of {len(site.ids)} edits") or
         (text(d, "#count") or "").endswith(" edits"), "the edit list loads")
    one(driver, "#token").send_keys(TOKEN)
    one(driver, "#token-set").click()
    wait(driver, lambda d: "token set" in (text(d, "#mode") or ""), "the token is taken")


def probe(driver, image: Path | None, question: str) -> str:
    one(driver, "#tab-probe").click()
    field = one(driver, "#probe-image")
    driver.execute_script("arguments[0].value = '';", field)
    if image is not None:
        field.send_keys(str(image))
    q = one(driver, "#probe-question")
    q.clear()
    q.send_keys(question)
    driver.execute_script("document.getElementById('probe-routed').textContent = '';")
    one(driver, "#probe-submit").click()
    return wait(driver, lambda d: text(d, "#probe-routed") or None, "the probe's routing is shown")


def select_edit(driver, eid: int) -> None:
    one(driver, "#tab-edits").click()
    one(driver, f'#edit-table tbody tr[data-id="{eid}"]').click()
    wait(driver, lambda d: text(d, "#detail h3") == f"Edit {eid}", f"edit {eid}'s detail")


# ------------------------------------------------------------------------------------------ tests


def test_edits_view_lists_thumbnails_state_scope_history_and_neighbours(driver, site):
    open_page(driver, site)
    assert driver.execute_script("return [sessionStorage.getItem('esg-memory-token'), localStorage.length, "
                                 "document.cookie]") == [TOKEN, 0, ""]
    rows = by_css(driver, "#edit-table tbody tr")
    assert sorted(int(r.get_attribute("data-id")) for r in rows) == sorted(site.ids.values())
    # thumbnails: fetched through GET /edits/{id}/image (with the token) into blob: URLs
    loaded = "return [...document.querySelectorAll('#edit-table img.thumb')].filter(i => i.naturalWidth)" \
             ".length"
    wait(driver, lambda d: d.execute_script(loaded) == 2, "two thumbnails load")
    assert "compiled" in text(driver, f'#edit-table tr[data-id="{site.ids["purple"]}"]')
    # the text filter searches metadata too
    one(driver, "#filter").send_keys("green")
    wait(driver, lambda d: len(by_css(d, "#edit-table tbody tr")) == 1, "the filter keeps one edit")
    one(driver, "#filter").clear()
    driver.execute_script("document.getElementById('filter').dispatchEvent(new Event('input'))")
    select_edit(driver, site.ids["purple"])
    detail = text(driver, "#detail")
    assert "anchor" in detail and "current" in detail and "threshold" in detail
    neighbours = [a.text for a in by_css(driver, "#detail table:nth-of-type(2) a.edit-link")]
    assert f"edit {site.ids['green']}" in neighbours and f"edit {site.ids['purple']}" not in neighbours
    shot(driver, "edits")
    assert_clean(driver, site.url)


def test_a_question_holding_markup_is_shown_as_text(driver, site):
    open_page(driver, site)
    eid = site.ids["xss"]
    assert text(driver, f'#edit-table tr[data-id="{eid}"] td.q') == XSS
    select_edit(driver, eid)
    assert XSS in text(driver, "#detail")
    assert driver.execute_script("return window.__xss === undefined")
    assert driver.execute_script("return document.querySelectorAll('img:not(.thumb):not(.big):not(.preview)')"
                                 ".length") == 0
    assert driver.execute_script("return document.querySelectorAll('main script').length") == 0
    assert_clean(driver, site.url)


def test_probe_shows_the_edit_that_fired_its_candidates_and_both_answers(driver, site):
    open_page(driver, site)
    routed = probe(driver, site.files["purple"], Q)
    assert routed.startswith(f"edit {site.ids['purple']} v1")
    cands = by_css(driver, "#candidates tbody tr")
    assert len(cands) >= 2 and "winner" in cands[0].get_attribute("class")
    assert "routed here" in cands[0].text and any("out of scope" in c.text or "in scope, but" in c.text
                                                  for c in cands[1:])
    assert text(driver, "#bare-answer") and f"[edit {site.ids['purple']}]" in text(driver, "#edited-answer")
    assert "routed to edit" in text(driver, "#probe-explanation")
    shot(driver, "probe")
    assert_clean(driver, site.url)


def test_an_edit_added_and_deleted_through_the_page_changes_the_next_probe(driver, site):
    open_page(driver, site)
    before = probe(driver, site.files["blue"], Q)
    one(driver, "#tab-edits").click()
    one(driver, "#add-box summary").click()
    one(driver, "#add-question").send_keys(Q)
    one(driver, "#add-answer").send_keys("blue")
    one(driver, "#add-image").send_keys(str(site.files["blue"]))
    one(driver, "#add-metadata").send_keys('{"ticket": "blue"}')
    driver.execute_script("document.getElementById('add-tune').value = 'never'")
    one(driver, "#add-submit").click()

    def added(d):
        s = text(d, "#status") or ""
        return s if s.startswith("added edit") else None

    status = wait(driver, added,
                  "the edit is added")
    new = int(status.split()[-1])
    assert new not in site.ids.values()
    wait(driver, lambda d: text(d, "#detail h3") == f"Edit {new}", "the new edit is shown")
    assert probe(driver, site.files["blue"], Q).startswith(f"edit {new} v1")
    assert not before.startswith(f"edit {new}")
    select_edit(driver, new)
    one(driver, "#delete-edit").click()  # arms
    one(driver, "#delete-edit").click()  # deletes
    wait(driver, lambda d: text(d, "#status") == f"deleted edit {new}", "the edit is deleted")
    assert site.client.get(f"/edits/{new}").status_code == 404
    after = probe(driver, site.files["blue"], Q)
    assert not after.startswith(f"edit {new}")
    assert_clean(driver, site.url)


def test_scope_map_draws_every_key_and_the_probes(driver, site):
    open_page(driver, site)
    probe(driver, site.files["green"], Q)
    one(driver, "#tab-map").click()
    n_keys = len(site.client.get("/scope-map").json()["points"])
    wait(driver, lambda d: len(by_css(d, "#map g.key")) == n_keys and len(by_css(d, "#map g.probe")) >= 1,
         "the map draws every key and the probe")
    assert len(by_css(driver, "#map-legend li")) == len(site.client.get("/edits").json()["edits"])
    assert "PCA explains" in text(driver, "#map-info")
    shot(driver, "scope-map")
    assert_clean(driver, site.url)


def test_this_is_wrong_sends_feedback(driver, site):
    open_page(driver, site)
    probe(driver, site.files["green"], "is this a picture?")
    one(driver, "#wrong").click()
    wait(driver, lambda d: not d.execute_script("return document.getElementById('feedback-box').hidden"),
         "the feedback form opens")
    driver.execute_script("document.getElementById('feedback-expected').value = ''")
    one(driver, "#feedback-send").click()
    wait(driver, lambda d: len(by_css(d, "#feedback-actions li")) >= 1, "feedback actions are listed")
    assert (text(driver, "#status") or "").startswith("feedback applied")
    assert_clean(driver, site.url)


# ------------------------------------------------------------------------------------------ audit


def loaded_images(driver, css: str) -> int:
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].filter(i => i.complete && i.naturalWidth)"
        ".length", css)


def choose(driver, select_id: str, value: str) -> None:
    driver.execute_script("const s = document.getElementById(arguments[0]); s.value = arguments[1]; "
                          "s.dispatchEvent(new Event('change'));", select_id, value)


def audit_rows(driver) -> list:
    return by_css(driver, "#audit-table tbody tr.audit-row")


def test_audit_view_shows_each_edits_label_probes_pictures_and_the_deletion_audit(driver, site):
    want = site.client.get("/audit").json()  # ours, retention
    rows = want["rows"]
    open_page(driver, site)
    one(driver, "#tab-audit").click()
    wait(driver, lambda d: len(audit_rows(d)) == len(rows), "a row per audited edit")
    assert [int(r.get_attribute("data-case")) for r in audit_rows(driver)] == [r["case"] for r in rows]
    assert [r.get_attribute("data-label") for r in audit_rows(driver)] == [r["label"] for r in rows]
    assert len(by_css(driver, "#audit-summary tbody tr")) == len(want["summary"])
    assert "current" in one(driver, '#audit-summary tr[data-method="ours"][data-protocol="retention"]'
                            ).get_attribute("class")
    wait(driver, lambda d: loaded_images(d, "#audit-table img.thumb") >= 1, "edit thumbnails load")
    # an edit's probes, with their pictures
    first = audit_rows(driver)[0]
    first.click()
    sub = f'#audit-table tr.audit-probes[data-case="{rows[0]["case"]}"]'
    wait(driver, lambda d: len(by_css(d, sub + " tbody tr")) == len(rows[0]["probes"]), "the edit's probes")
    pictured = sum(1 for p in rows[0]["probes"] if p["image"])
    wait(driver, lambda d: loaded_images(d, sub + " img.mini") == pictured, "the probes' thumbnails load")
    probe_text = text(driver, sub)
    assert all(p["question"] in probe_text and p["kind"] in probe_text for p in rows[0]["probes"])
    # the deletion audit: every deleted edit's probes
    n_del = sum(len(d["right_after"]) for d in want["deletions"])
    assert n_del > 0 and len(by_css(driver, "#deletion-table tbody tr")) == n_del
    assert "deleted edits" in text(driver, "#deletion-info")
    shot(driver, "audit")
    # another method: its own rows and labels; then a filter by label keeps exactly that label's rows
    other = site.client.get("/audit", params={"method": "always_nearest", "protocol": "immediate"}).json()
    choose(driver, "audit-method", "always_nearest")
    wait(driver, lambda d: "always_nearest" in (text(d, "#audit-count") or ""), "the method's rows load")
    choose(driver, "audit-protocol", "immediate")
    wait(driver, lambda d: "always_nearest, immediate" in (text(d, "#audit-count") or ""), "the protocol")
    assert [r.get_attribute("data-label") for r in audit_rows(driver)] == [r["label"] for r in other["rows"]]
    for label in [*sorted({r["label"] for r in other["rows"]}), "fail"]:
        n = sum(r["label"] == label for r in other["rows"])
        choose(driver, "audit-label", label)
        wait(driver, lambda d, n=n: len(audit_rows(d)) == n, f"the {label} filter")
        assert all(r.get_attribute("data-label") == label for r in audit_rows(driver))
        assert (text(driver, "#audit-count") or "").startswith(f"{n} of {len(other['rows'])} edits")
    choose(driver, "audit-label", "")
    wait(driver, lambda d: len(audit_rows(d)) == len(other["rows"]), "no filter")
    assert_clean(driver, site.url)


def test_an_audit_only_server_and_a_results_directory_opened_on_the_page(driver, eval_run):
    from esg_memory.serve.ui.audit_routes import create_audit_app

    with running(create_audit_app(eval_run)) as url, httpx.Client(base_url=url, timeout=60) as c:
        want = c.get("/audit").json()
        driver.get(url + "/ui")
        wait(driver, lambda d: len(audit_rows(d)) == len(want["rows"]), "the audit loads at once")
        assert driver.execute_script("return ['edits', 'probe', 'map'].map("
                                     "v => document.getElementById('tab-' + v).hidden)") == [True] * 3
        assert not driver.execute_script("return document.getElementById('view-audit').hidden")
        wait(driver, lambda d: loaded_images(d, "#audit-table img.thumb") >= 1, "thumbnails load")
        assert_clean(driver, url)
        # the same run opened from this computer: read in the browser, the same rows, pictures as blob:
        one(driver, "#audit-dir").send_keys(str(eval_run))
        wait(driver, lambda d: "opened from this computer" in (text(d, "#audit-run") or ""), "the local run")
        wait(driver, lambda d: len(audit_rows(d)) == len(want["rows"]), "its rows")
        labels = [r.get_attribute("data-label") for r in audit_rows(driver)]
        assert labels == [r["label"] for r in want["rows"]]
        wait(driver, lambda d: loaded_images(d, "#audit-table img.thumb") >= 1, "local thumbnails load")
        assert driver.execute_script("return [...document.querySelectorAll('#audit-table img.thumb')]"
                                     ".every(i => !i.src || i.src.startsWith('blob:'))")
        assert len(by_css(driver, "#deletion-table tbody tr")) == sum(len(d["right_after"])
                                                                      for d in want["deletions"])
        assert_clean(driver, url)
