"""The web page in a real browser: headless Chromium (the distribution's package) driven by Selenium through
the packaged chromedriver, against a real serve.py on loopback serving the tiny trained model.

The page only uses the HTTP API, so what is checked here is what a user sees: the limits shown, a
request for "seven" rendering the asked number of images, the trajectory playing its frames with t and
ᾱ_t, a guidance sweep, a bad value's message next to its field, and inpainting: the first image drawn
as the source, a preset mask, the kept half unchanged in the result, and a bad mask's message.
"""
from __future__ import annotations

import shutil

import pytest

from tests.serve_process import serve
from tests.tiny_trained import NUM_CLASSES, SIZE, save_tiny_checkpoint

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="no headless browser: apt-get install chromium chromium-driver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1000")
WAIT_S = 120  # sampling on a loaded 2-core CPU


def open_browser(user_data_dir) -> "webdriver.Chrome":
    options = Options()
    options.binary_location = CHROMIUM
    for flag in BROWSER_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={user_data_dir}")
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    checkpoint = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-ckpt"))
    with serve(checkpoint) as (url, _):
        driver = open_browser(tmp_path_factory.mktemp("chromium-profile"))
        try:
            driver.get(url + "/")
            WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
            yield driver
        finally:
            driver.quit()


def fill(driver, field_id: str, value: str) -> None:
    box = driver.find_element(By.ID, field_id)
    box.clear()
    box.send_keys(value)


def text(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def test_page_loads_with_the_servers_limits(page):
    samplers = [o.get_attribute("value") for o in page.find_elements(By.CSS_SELECTOR, "#sampler option")]
    assert samplers == ["ddpm", "ddim", "dpmpp", "euler", "heun"]
    assert len(page.find_elements(By.CSS_SELECTOR, "#class-buttons button")) == NUM_CLASSES
    assert "n × NFE ≤ 6400" in text(page, "limits") and "T = 100" in text(page, "model-info")
    assert "w = 0" in page.find_element(By.CSS_SELECTOR, ".meanings").text


def test_seven_renders_the_asked_number_of_images(page):
    fill(page, "prompt", "seven")
    fill(page, "n", "3")
    fill(page, "steps", "4")
    page.find_element(By.ID, "generate").click()
    WebDriverWait(page, WAIT_S).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#images img")) == 3)
    widths = page.execute_script("return [...document.querySelectorAll('#images img')].map(i => i.naturalWidth)")
    assert widths == [SIZE] * 3  # decoded PNGs of the model's size
    captions = [c.text for c in page.find_elements(By.CSS_SELECTOR, "#images figcaption")]
    assert captions == ["seed 0", "seed 1", "seed 2"]


def test_the_trajectory_plays_its_frames(page):
    fill(page, "steps", "6")
    page.find_element(By.ID, "trajectory-button").click()
    WebDriverWait(page, WAIT_S).until(lambda d: d.find_element(By.ID, "trajectory").get_attribute("data-frames") == "6")
    # playback reaches the last frame, labelled with its step, t and ᾱ_t as the API gave them
    last = page.execute_script("const f = frames[frames.length - 1]; return [f.t, f.alpha_bar.toFixed(4)]")
    WebDriverWait(page, 30).until(lambda d: text(d, "traj-label") == f"step 6 · t = {last[0]} · ᾱ_t = {last[1]}")
    for image_id in ("traj-xt", "traj-x0"):
        assert page.find_element(By.ID, image_id).get_attribute("src").startswith("data:image/png;base64,")


def test_guidance_sweep_shows_one_seed_at_each_w(page):
    fill(page, "steps", "3")
    fill(page, "sweep-ws", "0,1,3")
    page.find_element(By.ID, "sweep-button").click()
    WebDriverWait(page, WAIT_S).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#sweep img")) == 3)
    assert [c.text for c in page.find_elements(By.CSS_SELECTOR, "#sweep figcaption")] == ["w = 0", "w = 1", "w = 3"]


def test_a_bad_value_shows_the_servers_message_next_to_its_field(page):
    fill(page, "steps", "3")
    fill(page, "seed", "-1")
    page.find_element(By.ID, "generate").click()
    WebDriverWait(page, WAIT_S).until(lambda d: text(d, "error-seed"))
    assert "greater than or equal to 0" in text(page, "error-seed") and text(page, "error-prompt") == ""
    fill(page, "seed", "0")
    fill(page, "prompt", "eleven")
    page.find_element(By.ID, "generate").click()
    WebDriverWait(page, WAIT_S).until(lambda d: text(d, "error-prompt"))
    assert "cannot read 'eleven' as a class" in text(page, "error-prompt") and text(page, "error-seed") == ""
    fill(page, "prompt", "seven")
    fill(page, "n", "65")
    page.find_element(By.ID, "generate").click()
    WebDriverWait(page, WAIT_S).until(lambda d: text(d, "error-n"))
    assert "less than or equal to 64" in text(page, "error-n")


def _pixels(driver, selector: str) -> list[list[int]]:
    """The grey values of each image matching `selector`, read back through a canvas."""
    return driver.execute_script("""
        return [...document.querySelectorAll(arguments[0])].map((img) => {
          const c = document.createElement("canvas");
          c.width = img.naturalWidth; c.height = img.naturalHeight;
          const ctx = c.getContext("2d");
          ctx.drawImage(img, 0, 0);
          const rgba = ctx.getImageData(0, 0, c.width, c.height).data;
          return [...rgba].filter((_, i) => i % 4 === 0);
        });""", selector)


def test_inpainting_keeps_the_source_where_the_mask_is_black(page):
    fill(page, "prompt", "three")
    fill(page, "n", "1")
    fill(page, "steps", "6")
    page.find_element(By.ID, "generate").click()
    WebDriverWait(page, WAIT_S).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#images img")) == 1)
    source = _pixels(page, "#images img")[0]
    page.find_element(By.ID, "inpaint-use-first").click()
    page.find_element(By.CSS_SELECTOR, "#inpaint-mask-preset option[value='right']").click()
    mask = _pixels(page, "#inpaint-mask-preview")[0]
    assert set(mask) == {0, 255} and mask[0] == 0 and mask[SIZE - 1] == 255  # black left, white right
    fill(page, "prompt", "eight")
    fill(page, "n", "2")
    fill(page, "seed", "5")
    page.find_element(By.ID, "generate").click()
    WebDriverWait(page, WAIT_S).until(lambda d: "inpainted" in text(d, "status"))
    for result in _pixels(page, "#images img"):
        assert all(r == s for r, s, m in zip(result, source, mask) if m == 0)  # the left half is the source's
    page.find_element(By.ID, "inpaint-clear").click()
    fill(page, "seed", "0")


def test_a_mask_without_a_source_is_named_next_to_its_field(page):
    page.find_element(By.CSS_SELECTOR, "#inpaint-mask-preset option[value='top']").click()
    page.find_element(By.ID, "generate").click()
    WebDriverWait(page, WAIT_S).until(lambda d: text(d, "error-inpaint_image"))
    assert "needs both" in text(page, "error-inpaint_image")
    page.find_element(By.ID, "inpaint-clear").click()
