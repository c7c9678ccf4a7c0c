"""The web app (`spheregen serve`, spheregen.app): upload checks and grids without Gradio; the page itself driven
with gradio_client on a free loopback port (skipped, with the reason, when the `app` extra is absent); a slow
headless-Chromium screenshot that must show the sample grid (skipped without chromium)."""

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from spheregen import app as webapp
from spheregen.errors import UserError
from spheregen.models.sphere_encoder import SphereEncoder
from spheregen.models.sphere_encoder_nets import SphereEncoderConfig

HAVE_GRADIO = all(importlib.util.find_spec(m) for m in ("gradio", "gradio_client"))
NO_GRADIO = "the app extra is not installed (pip install 'spheregen[app]' or make app): gradio / gradio_client missing"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def checkpoints(tiny, tmp_path_factory) -> list[str]:
    torch.manual_seed(0)
    se = SphereEncoder(SphereEncoderConfig(image_size=16, channels=1, num_classes=3, patch_size=4, latent_dim=8,
                                           width=32, depth=1, heads=2, mixer_depth=1, perceptual="ssim"))
    path = tmp_path_factory.mktemp("app") / "se"
    se.save_pretrained(path)
    return [str(path), str(tiny / "ar")]


def test_upload_checks(tmp_path, monkeypatch):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(UserError, match="not an image"):
        webapp.check_upload(tmp_path / "notes.png")
    with pytest.raises(UserError, match="upload the image first"):
        webapp.check_upload(None, "the image")
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(webapp, "MAX_UPLOAD_PIXELS", 1000)
    with pytest.raises(UserError, match="too large"):
        webapp.check_upload(tmp_path / "big.png")
    monkeypatch.setattr(webapp, "MAX_UPLOAD_MB", 0)
    with pytest.raises(UserError, match="too large"):
        webapp.check_upload(tmp_path / "big.png")


def test_labels_classes_and_grid():
    assert webapp.checkpoint_labels(["runs/a/ckpt", "other/a/ckpt", "x/se"]) == \
        {"ckpt": "runs/a/ckpt", "a/ckpt": "other/a/ckpt", "se": "x/se"}
    assert webapp.parse_classes("", 3) == [0, 1, 2] and webapp.parse_classes("2, 1", 3) == [2, 1]
    assert webapp.parse_classes("5", 0) is None
    with pytest.raises(UserError, match="out of range"):
        webapp.parse_classes("3", 3)
    g = webapp.grid([Image.new("L", (16, 16))] * 6, 2)
    assert g.size == (6 * (3 * 18 + 2), 6 * (2 * 18 + 2)) and g.mode == "L"  # upscaled 96 // 16 = 6x
    bad = webapp.safe(lambda: (_ for _ in ()).throw(UserError("no")), 2)
    assert bad() == (None, "Error: no")


@pytest.fixture(scope="module")
def server(checkpoints):
    if not HAVE_GRADIO:
        pytest.skip(NO_GRADIO)
    port = webapp.free_port()
    page = webapp.serve(checkpoints, port=port, block=False, sample_on_load=True)
    yield f"http://127.0.0.1:{port}/"
    page.close()


@pytest.mark.skipif(not HAVE_GRADIO, reason=NO_GRADIO)
def test_app_samples_and_edits_over_http(server, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    image, status = client.predict("ar", "1,2", 2.0, 2, 0, 2, api_name="/generate")
    assert "4 images in" in status and Image.open(image).size == (3 * (2 * 30 + 2),) * 2  # 28 px: 3x
    image, status = client.predict("se", "", 1.0, 2, 3, 1, api_name="/generate")
    assert "3 images in" in status, status
    Image.open(image).convert("L").crop((12, 12, 108, 108)).resize((16, 16)).save(tmp_path / "a.png")
    Image.new("L", (40, 30), 255).save(tmp_path / "b.png")
    a, b = handle_file(str(tmp_path / "a.png")), handle_file(str(tmp_path / "b.png"))
    image, status = client.predict("se", a, 2, 2, 0, api_name="/manipulate")
    assert image and "class 2" in status, status
    image, status = client.predict("se", a, b, "top-bottom", 2, 0, api_name="/crossover")
    assert image and "composite" in status, status
    image, status = client.predict("se", a, b, 4, 1, api_name="/interpolate")
    assert image and "4 images from A to B" in status, status
    (tmp_path / "notes.png").write_text("not an image")
    image, status = client.predict("se", handle_file(str(tmp_path / "notes.png")), 1, 1, 0, api_name="/manipulate")
    assert image is None and status.startswith("Error:") and "not an image" in status and "Traceback" not in status
    image, status = client.predict("ar", a, 1, 1, 0, api_name="/manipulate")
    assert image is None and "needs a Sphere Encoder" in status
    image, status = client.predict("se", "7", 1.0, 1, 0, 1, api_name="/generate")
    assert image is None and "out of range" in status


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_GRADIO, reason=NO_GRADIO)
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_chromium_screenshot_shows_the_grid(server, tmp_path):
    """Headless Chromium renders the page (it draws a grid on load) and shows the sample image; the screenshot
    lands in $SPHEREGEN_ARTIFACTS (default: the test's tmp dir)."""
    out = Path(os.environ.get("SPHEREGEN_ARTIFACTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", "--window-size=1200,1400", "--virtual-time-budget=20000"]
    for attempt in range(3):  # the grid drawn on load can take longer than the first render on a busy machine
        dom = subprocess.run(flags + [f"--user-data-dir={tmp_path / f'profile{attempt}'}", "--dump-dom", server],
                             capture_output=True, text=True, timeout=180)
        assert 'id="samples"' in dom.stdout, dom.stderr[-2000:]
        grid_block = dom.stdout.split('id="samples"', 1)[1].split('id="sample-status"', 1)[0]
        if "<img" in grid_block:
            break
    assert "<img" in grid_block and "image.png" in grid_block, "the sample grid is not on the page"
    shot = out / "app.png"
    subprocess.run(flags + [f"--user-data-dir={tmp_path / 'shot-profile'}", f"--screenshot={shot}", server],
                   capture_output=True, text=True, timeout=180, check=True)
    with Image.open(shot) as im:
        assert im.size == (1200, 1400)
        black = (im.convert("L").point(lambda v: 255 if v == 0 else 0).getbbox() or (0, 0, 0, 0))
    # the grid's black border (the rest of the page has no pure black) is drawn as a large rectangle
    assert black[2] - black[0] > 200 and black[3] - black[1] > 200, f"no sample grid in the screenshot {shot}"


def test_serve_without_gradio_says_how_to_install(monkeypatch, capsys):
    from spheregen.cli import main

    monkeypatch.setitem(__import__("sys").modules, "gradio", None)  # import gradio -> ImportError
    assert main(["serve", "--ckpt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "spheregen[app]" in err and "make app" in err
