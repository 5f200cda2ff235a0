"""Tests of browser.py: the page's data from a finished tiny run, its escaping, and the page itself
in a real headless Chromium (Debian's chromium and chromedriver, driven by selenium) that may reach
nothing but the page's own file."""

import io
import json
import re
import shutil
from types import SimpleNamespace

import pytest
import torch

import dualenc as de
from referee import browser, checkpoint, runner
from referee import replicate as rp
from conftest import tiny_run_cfg


def embedded(html):
    """The page's data, read back as the page's script reads it."""
    start = html.index('<script id="data" type="application/json">') + 42
    return json.loads(html[start:html.index("</script>", start)])


def test_embedded_json_cannot_close_its_script_element():
    text = "a </script><script>alert(1)</script> & \u2028 \u2029 é"
    html = browser.page_html({"vocab": [text], "texts": {}, "identity": [], "integration": []})
    assert "</script><script>alert" not in html and "\u2028" not in html and "é" not in html
    assert embedded(html)["vocab"] == [text]


def test_codes_are_grouped_by_feature_largest_first():
    vals_BK = torch.tensor([[3.0, 1.0], [2.0, 0.0], [5.0, 4.0], [0.0, 0.0]])
    idx_BK = torch.tensor([[0, 2], [2, 1], [2, 0], [1, 3]])
    codes = browser.sparse_codes(lambda x: (vals_BK[x[:, 0].long()], idx_BK[x[:, 0].long()]),
                                 torch.arange(4.0)[:, None], n_features=4, batch_size=2)
    assert [codes.count(f) for f in range(4)] == [2, 0, 3, 0]  # the 0 in token 1 is not a code
    assert codes.n_tokens == 4  # token 3 has no active feature, and still counts in the rates
    assert codes.token[codes.of(2)].tolist() == [2, 1, 0]
    assert codes.value[codes.of(2)].tolist() == [5.0, 2.0, 1.0]


def test_a_page_is_built_from_models_and_codes_in_memory(tmp_path, monkeypatch):
    """write_page needs no run folder: the models, the held-out tokens and the stimulus codes are
    its whole input, and browser.html is all it writes, from any working directory."""
    monkeypatch.chdir(tmp_path)  # the page's HTML, CSS and JavaScript are found beside browser.py
    g = torch.Generator().manual_seed(0)
    D, F, K, M, P = 8, 32, 4, 6, 16
    torch.manual_seed(0)
    joint = de.DualEncoder(de.TopKSAE(D, F, K), de.NFM(F, D, M)).eval()
    secondary = de.DualEncoder(de.TopKSAE(M, 4 * M, 3), None, torch.zeros(M), torch.ones(M)).eval()
    data = SimpleNamespace(x_eval=torch.randn(30, D, generator=g),
                           eval_keep=torch.ones(3, 10, dtype=bool),
                           eval_ids=torch.randint(50, (3, 10), generator=g))
    tokenizer = SimpleNamespace(decode=lambda ids: f"t{ids[0]}")
    stimulus = (torch.rand(P, 4 * M, generator=g), torch.arange(P) % 4, torch.arange(P) < P // 2)
    written = browser.write_page(tmp_path, tokenizer, joint, secondary, data, stimulus,
                                 ["a", "b", "c", "d"], "in memory")
    assert [f.name for f in tmp_path.iterdir()] == ["browser.html"]
    html = (tmp_path / "browser.html").read_text(encoding="utf-8")
    assert written == {"bytes": len(html.encode()), "files": 1}
    shown = embedded(html)
    assert shown["summary"] == "in memory" and shown["cells"] == ["a", "b", "c", "d"]
    assert len(shown["identity"]) == F and len(shown["integration"]) == 4 * M
    alive = [p for p in shown["integration"] if p is not None]
    assert alive and all(len(p["cells"]["test"]) == 4 for p in alive)
    assert all(shown["vocab"][i].startswith("t") for row in shown["texts"].values() for i in row)


@pytest.fixture(scope="module")
def page(tiny_run, tmp_path_factory):
    """A copy of the tiny run with its browser.html."""
    folder = tmp_path_factory.mktemp("browsed") / "run"
    shutil.copytree(tiny_run[0], folder)
    report = rp.run(rp.Config(eval_only=str(folder), browser=True, device="cpu"))
    html = (folder / "browser.html").read_text(encoding="utf-8")
    return folder, report, html, embedded(html)


def test_a_finished_run_gets_a_page_of_its_features(page):
    folder, report, html, data = page
    models, _ = runner.load_run(folder, rp.Config)
    joint = models["joint"]
    assert (folder / "secondary" / "cfg.json").exists()  # stage 3 was trained for it
    assert "default-src 'none'" in html and "file:" not in html.split("</head>")[0]
    assert report["browser"] == {**report["browser"], "files": 1, "bytes": len(html.encode())}
    assert len(data["identity"]) == joint.sae.W_dec.shape[0] == len(sum(data["norms"]["members"],
                                                                         []))
    alive = [g for g, p in enumerate(data["integration"]) if p is not None]
    assert alive and len(data["cells"]) == 4
    for g in alive:
        p = data["integration"][g]
        assert p["top"] and p["top"][0][2] == browser.LEVELS and len(p["pairs"]) > 0
        assert len(p["cells"]["selection"]) == len(p["cells"]["test"]) == 4
        for i, j, _ in p["pairs"]:  # the reverse table: each identity feature names its readers
            assert sorted(set(data["identity"][i]["used_by"])) == data["identity"][i]["used_by"]
            assert g in data["identity"][i]["used_by"] and g in data["identity"][j]["used_by"]
        for w, pos, _ in p["top"]:
            assert 0 <= data["texts"][str(w)][pos] < len(data["vocab"])


def test_a_pages_pairs_and_constant_give_back_the_pre_activation(page):
    folder, _, _, data = page
    models, _ = runner.load_run(folder, rp.Config)
    joint = models["joint"].double()
    secondary = checkpoint.load_model(folder / "secondary").double()
    g = next(g for g, p in enumerate(data["integration"]) if p is not None)
    x_BD = 2 * torch.randn(6, joint.sae.W_dec.shape[1], dtype=torch.float64)
    with torch.no_grad():
        pairs, const, pre = browser.pair_table(joint, secondary, x_BD, g, n=10 ** 6)  # every pair
        hidden = secondary.normalize(joint.nfm.hidden(*joint.nfm.read(*joint.sae.encode(x_BD))))
        direct = (hidden @ secondary.sae.W_enc[:, g] + secondary.sae.b_enc[g]).mean().item()
    assert pre == pytest.approx(direct, abs=1e-5)
    assert const + sum(m for _, _, m in pairs) == pytest.approx(direct, abs=1e-5)


def test_every_link_of_the_page_has_its_target_and_no_url_leaves_it(page):
    _, _, html, data = page
    assert not re.search(r"(https?:)?//[a-z0-9]", html.replace("default-src", ""), re.I)
    n_identity, n_integration = len(data["identity"]), len(data["integration"])
    for p in filter(None, data["integration"]):
        assert all(0 <= i < n_identity and 0 <= j < n_identity for i, j, _ in p["pairs"])
    for p in data["identity"]:
        assert all(data["integration"][g] is not None for g in p["used_by"])
    assert all(0 <= f < n_identity for members in data["norms"]["members"] for f in members)
    assert max(g for g in range(n_integration)) < n_integration


def test_a_run_without_a_joint_model_has_no_page(tiny_lm_folder, tmp_path):
    rp.run(tiny_run_cfg(tiny_lm_folder, tmp_path, models="sae"))
    with pytest.raises(de.DualencError, match="no joint model"):
        rp.run(rp.Config(eval_only=str(tmp_path), browser=True, device="cpu"))
    with pytest.raises(de.DualencError, match="with --eval-only"):
        rp.parse_args(["--browser"])
    assert not (tmp_path / "browser.html").exists()


# ----------------------------------------------------------------------------- in a real browser

@pytest.fixture(scope="module")
def chromium():
    """Headless Chromium whose host resolver refuses every name, with its console and network
    logged."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,900", "--host-resolver-rules=MAP * ~NOTFOUND"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


def forget_logs(driver):
    """Drop what earlier tests left in the driver's logs."""
    driver.get_log("performance")
    driver.get_log("browser")


def requests_made(driver):
    """The URLs the page asked for since the last call."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


@pytest.mark.slow  # Chromium
def test_the_page_works_offline_in_chromium(page, chromium):
    from matplotlib.image import imread
    from selenium.webdriver.common.by import By

    folder, _, _, data = page
    url = (folder / "browser.html").as_uri()
    forget_logs(chromium)
    chromium.get(url)
    assert {u.split("#")[0] for u in requests_made(chromium)} <= {url}
    assert [e for e in chromium.get_log("browser") if e["level"] == "SEVERE"] == []
    pixels = imread(io.BytesIO(chromium.get_screenshot_as_png()), format="png")
    assert pixels.std() > 0.02  # the front page is drawn, not blank

    bar = next(b for b in chromium.find_elements(By.CSS_SELECTOR, "rect.bar")
               if int(b.get_attribute("data-count")) > 0)
    bar.click()
    listed = chromium.find_elements(By.CSS_SELECTOR, "#members .member")
    assert len(listed) == int(bar.get_attribute("data-count"))

    g = next(g for g, p in enumerate(data["integration"]) if p is not None)
    chromium.get(f"{url}#int-{g}")
    rows = chromium.find_elements(By.CSS_SELECTOR, "#pairs tr")
    assert len(rows) == 1 + len(data["integration"][g]["pairs"])
    assert "2 x 2 cell means" in chromium.find_element(By.TAG_NAME, "main").text

    chromium.get(url)
    search = chromium.find_element(By.ID, "q")
    search.send_keys(str(g))
    shown = [a.text for a in chromium.find_elements(By.CSS_SELECTOR, "#list .entry a")]
    assert shown == [f"int {g}"]
    found = [a.text for a in chromium.find_elements(By.CSS_SELECTOR, "#identity-found a")]
    assert found == ([f"id {g}"] if g < len(data["identity"]) else [])
    search.clear()
    word = next(data["vocab"][data["texts"][str(w)][pos]].strip() for w, pos, _ in
                data["integration"][g]["top"] if data["vocab"][data["texts"][str(w)][pos]].strip())
    search.send_keys(word)
    shown = [a.text for a in chromium.find_elements(By.CSS_SELECTOR, "#list .entry a")]
    assert f"int {g}" in shown and len(shown) <= sum(p is not None for p in data["integration"])
    assert [e for e in chromium.get_log("browser") if e["level"] == "SEVERE"] == []
    assert {u.split("#")[0] for u in requests_made(chromium)} <= {url}


@pytest.mark.slow  # Chromium
def test_corpus_text_cannot_break_the_page(page, chromium, tmp_path):
    from selenium.webdriver.common.by import By

    _, _, _, data = page
    hostile = "</script><img src=x onerror=alert(1)>\u2028\ufffd"  # and a broken byte-level token
    g = next(g for g, p in enumerate(data["integration"]) if p is not None)
    w, pos, _ = data["integration"][g]["top"][0]
    data = {**data, "vocab": list(data["vocab"])}
    data["vocab"][data["texts"][str(w)][pos]] = hostile
    path = tmp_path / "browser.html"
    browser.write_browser(path, data)
    forget_logs(chromium)
    chromium.get(f"{path.as_uri()}#int-{g}")
    shown = chromium.find_element(By.TAG_NAME, "main").text
    assert "</script><img src=x onerror=alert(1)>" in shown
    assert chromium.find_elements(By.TAG_NAME, "img") == []
    assert [e for e in chromium.get_log("browser") if e["level"] == "SEVERE"] == []


@pytest.mark.slow  # Chromium
def test_a_page_past_its_budget_reads_its_features_from_files_beside_it(page, chromium, tmp_path):
    from selenium.webdriver.common.by import By

    _, _, _, data = page
    path = tmp_path / "browser.html"
    files = browser.write_browser(path, data, budget=20_000)
    html = path.read_text(encoding="utf-8")
    assert len(files) > 2 and embedded(html)["integration"] is None and len(html) < len(page[2])
    allowed = {f.as_uri() for f in files}
    g = next(g for g, p in enumerate(data["integration"]) if p is not None)
    f = data["integration"][g]["pairs"][0][0]
    forget_logs(chromium)
    chromium.get(f"{path.as_uri()}#int-{g}")
    rows = chromium.find_elements(By.CSS_SELECTOR, "#pairs tr")
    assert len(rows) == 1 + len(data["integration"][g]["pairs"])
    chromium.get(f"{path.as_uri()}#id-{f}")
    assert f"int {g}" in chromium.find_element(By.TAG_NAME, "main").text
    assert {u.split("#")[0] for u in requests_made(chromium)} <= allowed
    assert [e for e in chromium.get_log("browser") if e["level"] == "SEVERE"] == []
    browser.write_browser(path, data)  # within its budget again: one file, the data files gone
    assert not (tmp_path / "browser_data").exists()

