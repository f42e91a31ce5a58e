"""`consissr demo` in a real headless browser: upload, run, the 4x result appears, the warning shows.

The model is ``BicubicTestDouble`` (real bicubic x4 behind the pipeline's protocol); the page, the
upload, the click, the progress and the result are the real Gradio app in Debian's Chromium.
"""

import shutil
import socket
import subprocess

import numpy as np
import pytest
from bicubic_double import BicubicTestDouble
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed with apt when missing (about 20 s); a skip naming why where it cannot be."""
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pyproject pins it)")
    pytest.importorskip("gradio", reason="gradio is not installed (pyproject pins it)")
    if not shutil.which(CHROMIUM):
        if not shutil.which("apt-get"):
            pytest.skip(f"{CHROMIUM} is missing and this system has no apt-get to install it")
        try:
            for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
                proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
                if proc.returncode != 0:
                    pytest.skip(f"cannot install chromium ({' '.join(cmd)}): {proc.stderr.strip()[-300:]}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"cannot install chromium: {exc}")
        if not shutil.which(CHROMIUM):
            pytest.skip(f"apt-get installed chromium but {CHROMIUM} is still missing")
    return CHROMIUM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_upscales_an_upload_in_a_real_browser(chromium, tmp_path):
    from playwright.sync_api import sync_playwright

    from consissr.inference.demo import launch

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    pipe = BicubicTestDouble({"steps": 40, "prior_pretrained": False, "backbone": "embedded"})
    demo = launch(pipe, port=_free_port(), block=False)
    try:
        assert demo.local_url.startswith("http://127.0.0.1:")  # bound to this machine only
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=FLAGS)
            page = browser.new_page()
            page.goto(demo.local_url)
            banner = page.inner_text("#training-warning", timeout=60_000)
            assert "SD 2.1" in banner and "gan mode" in banner  # the real result this machine can give
            page.set_input_files("#input input[type=file]", str(tmp_path / "in.png"))
            page.wait_for_selector("#input img", timeout=30_000)
            page.get_by_label("gan", exact=True).check()  # the third mode: Real-ESRGAN alone
            page.click("#run")
            page.wait_for_function("() => { const i = document.querySelector('#output img');"
                                   " return i && i.complete && i.naturalWidth > 0; }", timeout=120_000)
            size = page.evaluate("() => { const i = document.querySelector('#output img');"
                                 " return [i.naturalWidth, i.naturalHeight]; }")
            slider = page.evaluate("() => [...document.querySelectorAll('#before-after img')]"
                                   ".map(i => [i.naturalWidth, i.naturalHeight])")
            browser.close()
    finally:
        demo.close()
    assert size == [120, 80]  # 4x the 30x20 upload
    assert slider and all(s == [120, 80] for s in slider)  # before and after at the output size
    assert len(pipe.calls) == 1 and pipe.calls[0]["mode"] == "gan"
