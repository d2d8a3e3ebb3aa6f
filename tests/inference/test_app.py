"""`tmot serve`: the page's handlers (bounded inputs, seeds as `tmot sample`, captions, the card) and, in a
slow test, the real page driven by a headless Chromium: type a prompt, click Generate, get images."""

import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import cli_env
from PIL import Image

from transfusion_mot.common.errors import InvalidInput
from transfusion_mot.inference.app import Limits, ServeApp
from transfusion_mot.inference.pipeline import Pipeline


@pytest.fixture(scope="module")
def app(tiny_run):
    return ServeApp(Pipeline.from_run(tiny_run), Limits(max_prompts=3, max_images=4, max_steps=20), source="tiny")


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_generate_gives_the_images_tmot_sample_gives(app, rescale):
    out = app.generate("a red square\n\n a blue square \n", images_per_prompt=2, seed=5, cfg=2.0, steps=3,
                       guidance_rescale=rescale)
    assert [caption for _, caption in out] == ["a red square · seed 5", "a red square · seed 6",
                                               "a blue square · seed 7", "a blue square · seed 8"]
    same = app.pipe.generate(["a red square", "a red square", "a blue square", "a blue square"], seed=[5, 6, 7, 8],
                             cfg_scale=2.0, num_steps=3, scheduler="ddpm", guidance_rescale=rescale)
    for (image, _), expected in zip(out, same):
        assert image.size == (16, 16) and np.array_equal(np.asarray(image), np.asarray(expected))


@pytest.mark.parametrize("kwargs,message", [
    ({"prompts_text": "  \n"}, "type a prompt"),
    ({"prompts_text": "a\nb\nc\nd"}, "4 prompts: at most 3"),
    ({"prompts_text": "x" * 501}, "at most 500"),
    ({"prompts_text": "a red square", "images_per_prompt": 5}, "between 1 and 4 images"),
    ({"prompts_text": "a red square", "steps": 21}, "steps must be between 1 and 20"),
    ({"prompts_text": "a red square", "steps": 5, "cfg": -1}, "guidance must be between 0 and 20"),
    ({"prompts_text": "a red square", "steps": 5, "scheduler": "flow"}, "this model samples with ddpm, ddim"),
    ({"prompts_text": "a red square", "steps": 5, "guidance_rescale": 1.5}, r"guidance_rescale must be .* \[0, 1\]"),
    ({"prompts_text": "x" * 200, "steps": 5}, "more than the model's max_seq_len 96"),  # the context, by name
])
def test_requests_beyond_the_limits_are_refused_with_a_message(app, kwargs, message):
    with pytest.raises(InvalidInput, match=message):
        app.generate(**kwargs)


def test_caption_and_card(app):
    image = app.generate("a red square", steps=2)[0][0]
    assert app.caption(image, max_new_tokens=5) == app.pipe.caption([image], max_new_tokens=5)[0]
    with pytest.raises(InvalidInput, match="upload or drop an image"):
        app.caption(None)
    with pytest.raises(InvalidInput, match="between 1 and 64 tokens"):
        app.caption(image, max_new_tokens=65)
    card = app.card()
    assert not card.startswith("---") and "## Model" in card and "## Training" in card


def test_the_page_builds_with_a_queue_of_one(app):
    page = app.blocks()
    assert page.title == "transfusion-mot"
    assert page._queue.default_concurrency_limit == 1 and page._queue.max_size == 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_the_served_page_draws_images_in_a_real_browser(tiny_run, tmp_path):
    from playwright.sync_api import sync_playwright

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "transfusion_mot", "serve", "--run", str(tiny_run), "--port",
                               str(port), "--device", "cpu"], env=cli_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium"), headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            deadline = time.time() + 120
            while True:  # the server loads the model first
                try:
                    page.goto(url, wait_until="domcontentloaded", timeout=5000)
                    break
                except Exception:
                    if time.time() > deadline or server.poll() is not None:
                        raise AssertionError(f"the server did not come up: {server.stdout.read()[-2000:]}") from None
                    time.sleep(1)
            page.locator("#prompts textarea").fill("a large red circle")
            page.locator("#generate").click()
            images = page.locator("#gallery img")
            images.first.wait_for(timeout=120_000)
            page.wait_for_timeout(500)
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            count = images.count()
            src = images.first.get_attribute("src")
            browser.close()
        assert count == 4  # the default: 4 images per prompt
        import urllib.request

        with urllib.request.urlopen(src if src.startswith("http") else url + src) as response:
            image = Image.open(response).convert("RGB")
        pixels = np.asarray(image).astype(float)
        assert image.size == (16, 16) and pixels.std() > 1.0  # an image of the model's size, not blank
        shutil.copy(tmp_path / "page.png", tmp_path.parent / "serve-page.png")
    finally:
        server.terminate()
        server.wait(timeout=30)
