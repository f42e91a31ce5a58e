import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A folder of ../shared/data, or a skip with the reason when this checkout has none."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.is_dir():
        pytest.skip(f"sample data {path} is absent (it lives beside the repo, never inside it)")
    return path


def copy_tracked_files(dest: Path) -> Path:
    """The repository's git-tracked files, copied into ``dest`` (a fresh checkout for `dvc repro` tests)."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    return dest


# end-to-end copies need working stages, not good models: the VAE trains 10 steps instead of 500
SHORT_TRAINING = {"train_vae.steps": 10}


@pytest.fixture(scope="session")
def dvc_cache(tmp_path_factory) -> Path:
    """One DVC cache for the end-to-end copies (`dvc cache dir --local`): a stage that already ran in
    another copy with the same command, dependencies and params is restored from DVC's run cache."""
    return tmp_path_factory.mktemp("dvc-cache")


@pytest.fixture(scope="session")
def user_photos(tmp_path_factory) -> Path:
    """A folder as a user would bring: other names, sizes and formats — an alpha PNG, a
    16-bit PNG, a gray JPEG, four JPEG photos — and three broken files. The photos are scikit-image's
    (none of evaluate's chelsea and coffee); one folder per session, so the end-to-end copies that
    name it share DVC's run cache."""
    import numpy as np
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("my photos")
    for name, rgb in [("IMG_2041.JPG", data.astronaut()), ("rocket launch.jpeg", data.rocket()),
                      ("DSC-0007.jpg", data.stereo_motorcycle()[0]), ("holiday_03.jpg", data.immunohistochemistry())]:
        Image.fromarray(rgb).save(folder / name, quality=90)
    Image.fromarray(data.camera()).save(folder / "gray camera.jpg", quality=90)
    Image.fromarray(data.logo()).save(folder / "logo_alpha.png")  # RGBA
    deep = (data.colorwheel()[..., 0].astype(np.uint16) * 257)  # one 16-bit channel
    Image.fromarray(deep).save(folder / "wheel16.png")
    (folder / "notes.png").write_text("not an image")
    (folder / "empty.jpg").write_bytes(b"")
    jpeg = (folder / "IMG_2041.JPG").read_bytes()
    (folder / "cut off.jpg").write_bytes(jpeg[: len(jpeg) // 3])  # a truncated JPEG
    return folder


def set_params(params_path: Path, values: dict) -> None:
    """Set dotted keys (``"train_vae.steps": 10``) in a copy's params.yaml (its comments are dropped)."""
    import yaml

    raw = yaml.safe_load(params_path.read_text())
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for key in parents:
            node = node[key]
        assert leaf in node, f"{dotted} is not in {params_path}"
        node[leaf] = value
    params_path.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="session", autouse=True)
def _mlflow_store_outside_the_checkout(tmp_path_factory):
    """Runs that a test does not point elsewhere go to a session store, not the checkout's mlflow.db."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """The embedded backbone, built once per test session through the `backbone` stage code."""
    from consissr.models.backbone import build_tiny_backbone

    return build_tiny_backbone(tmp_path_factory.mktemp("backbone") / "backbone", seed=0)


# --------------------------------------------------------------------------------------------
# browser tests and local servers (test_browser_mlflow.py, test_browser_prefect.py, test_promote_flow.py)
# --------------------------------------------------------------------------------------------
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]


def chromium() -> str:
    """Debian's chromium, installed with apt when missing; a skip naming why when it cannot be had."""
    if not CHROMIUM.exists() and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, timeout=600)
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent and `apt-get install -y chromium` could not install it (root + apt needed)")
    return str(CHROMIUM)


@contextmanager
def chromium_page(timeout_ms: int = 180_000):
    """A page of headless Chromium (playwright driving Debian's chromium); closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(timeout_ms)
            yield page
        finally:
            browser.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    """Poll ``url`` until it answers; fail with the server's log when it exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{url} did not answer in {timeout} s\n" + log.read_text()[-3000:]
            time.sleep(0.5)


def venv_bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """docs/orchestration.md's `prefect server start --host 127.0.0.1` on a free port, with its own PREFECT_HOME.

    Yields the environment that points the prefect CLI, workers and flows at it (``PREFECT_API_URL``);
    ``PREFECT_UI_API_URL`` tells the UI where its API is (it assumes port 4200 otherwise).
    """
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_API_URL=api, PREFECT_UI_API_URL=api,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="INFO", PYTHONPATH=str(REPO),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    log_path = home / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([venv_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_http(f"{api}/health", proc, log_path)
            yield env
        finally:
            os.killpg(proc.pid, signal.SIGTERM)  # its own process group: the server and its services
            proc.wait(30)
