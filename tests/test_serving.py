"""The Ray Serve app, end to end: `genderrec serve --config configs/serve.yaml` on the session's local Ray, real HTTP.

One deployment serves the whole module (a replica loads TensorFlow, which is the slow part). Its model is the
tiny test model with a temperature in its card, so every comparison also checks that calibration is applied.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from genderrec import bundle, images, serving
from genderrec.faces import NO_FACE, FaceOptions, face_crops
from tests.helpers.chromium import chromium
from tests.helpers.net import free_port
from tests.helpers.photos import detector, iou, layout, match, no_face_photo, png_with_declared_size

REPO = Path(__file__).resolve().parents[1]
SERVE_CONFIG = REPO / "configs" / "serve.yaml"
ARTIFACTS = REPO / "artifacts" / "serving"
STARTUP_TIMEOUT_S = 600
TEMPERATURE = 2.0


@pytest.fixture(scope="module")
def served_model(tiny_model_dir, tmp_path_factory):
    """A copy of the tiny model directory whose card carries a calibration temperature, and its loaded bundle."""
    model_dir = tmp_path_factory.mktemp("served") / "selected"
    shutil.copytree(tiny_model_dir, model_dir)
    card = bundle.read_card(str(model_dir))
    bundle.write_card(str(model_dir), card.model_copy(update={"temperature": TEMPERATURE}))
    return model_dir, bundle.ModelBundle.load(str(model_dir))


@pytest.fixture(scope="module")
def base_url(ray_session, served_model, tmp_path_factory):
    """`genderrec serve` started as a user would, on the session's Ray; stopped with Ctrl-C (SIGINT) at the end."""
    from ray import serve

    model_dir = served_model[0]
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "genderrec-serve.log"
    command = [
        sys.executable,
        "-m",
        "genderrec",
        "serve",
        "--config",
        str(SERVE_CONFIG),
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--address",
        ray_session.get_runtime_context().gcs_address,
        "--set",
        "max_batch_size=8",
        "--set",
        "batch_wait_timeout_s=0.05",
        "--set",
        "autoscaling_config.max_replicas=1",
    ]
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(url, process, log)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            code = f"killed after 120 s; its threads were:\n{_stacks(process.pid)}"
            process.kill()
        serve.shutdown()  # a no-op when Ctrl-C already shut Serve down
    assert code == 0, f"genderrec serve did not stop cleanly on Ctrl-C ({code}); log: {log}"


def _stacks(pid: int) -> str:
    """A hung process's signal masks and its Python and native stacks (py-spy comes with ray[default])."""
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        return "(py-spy not installed)"
    dump = subprocess.run([py_spy, "dump", "--native", "--pid", str(pid)], capture_output=True, text=True, timeout=60)
    signal_state = [line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Sig")]
    return "\n".join(signal_state) + "\n" + dump.stdout + dump.stderr


def _wait_until_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"genderrec serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    pytest.fail(f"genderrec serve not healthy after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def faces(real_faces):
    """Eight real faces as (file name, bytes)."""
    paths = [Path(uri) for uri in real_faces["image_uri"].iloc[::8]]
    return [(path.name, path.read_bytes()) for path in paths]


def expected_p_male(served_model, datas) -> np.ndarray:
    """What the app must answer: the card's calibration applied to `model.predict` on the shared decoder's pixels."""
    served = served_model[1]
    return served.predict_proba(np.stack([served.load_pixels(data) for data in datas]))


def predict(client: httpx.Client, **request) -> list[dict]:
    response = client.post("/v1/predict", **request)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def test_serve_config_validates_with_serve_schema():
    from ray._common.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    config = serving.read_config(str(SERVE_CONFIG))
    assert isinstance(config, ServeDeploySchema)
    assert (config.http_options.host, config.http_options.port) == ("127.0.0.1", 8000)
    app = serving.application(config)
    assert import_attr(app.import_path) is serving.app_builder
    args = serving.ServeArgs.model_validate(app.args)
    assert args.max_body_bytes == 10 * 1024 * 1024 and args.autoscaling_config.max_replicas >= 1


def test_settings_merge_the_config_overrides_and_flags(tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tiny_model_dir.parent)
    settings = serving.settings(
        str(SERVE_CONFIG), ["autoscaling_config.max_replicas=1", "max_batch_size=8"], port=9000, model="selected"
    )
    assert settings.args.model == str(tiny_model_dir)  # relative paths become absolute for the replicas
    assert settings.args.max_batch_size == 8 and settings.args.batch_wait_timeout_s == 0.01
    scaling = settings.args.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 1, 16)
    assert settings.url == "http://127.0.0.1:9000/"
    assert serving.settings(model=str(tiny_model_dir)).url == "http://127.0.0.1:8000/"  # no config: loopback
    with pytest.raises(bundle.BundleError, match="no card.json"):
        serving.settings(str(SERVE_CONFIG))  # its model, runs/local/selected, is not under the test's folder


def test_builder_args_are_strict(tmp_path):
    with pytest.raises(ValueError, match="max_batch_sise"):
        serving.ServeArgs.model_validate({"model": "m", "max_batch_sise": 8})
    with pytest.raises(ValueError, match="not both"):
        serving.ServeArgs(model="m", num_replicas=2, autoscaling_config={"min_replicas": 1, "max_replicas": 2})
    with pytest.raises(bundle.BundleError, match="no card.json"):
        serving.app_builder({"model": str(tmp_path)})
    broken = tmp_path / "serve.yaml"
    broken.write_text(SERVE_CONFIG.read_text().replace("max_batch_size:", "max_batch:"))
    with pytest.raises(
        ValueError, match=r"(?s)serve.yaml: application 'genderrec' args: .*max_batch\n.*Extra inputs are not permitted"
    ):
        serving.read_config(str(broken))


def test_builder_sets_replica_options(ray_session, tiny_model_dir):
    args = {"model": str(tiny_model_dir), "max_ongoing_requests": 32, "health_check_period_s": 5}
    shared_gpu = serving.app_builder({**args, "num_gpus": 0.5, "autoscaling_config": {"max_replicas": 3}})
    deployment = shared_gpu._bound_deployment  # what Serve deploys (Serve's own tests read it the same way)
    assert deployment.max_ongoing_requests == 32
    assert deployment._deployment_config.health_check_period_s == 5
    assert deployment._deployment_config.autoscaling_config.max_replicas == 3
    assert deployment.ray_actor_options["num_gpus"] == 0.5
    assert deployment.ray_actor_options["runtime_env"]["env_vars"] == {"TF_FORCE_GPU_ALLOW_GROWTH": "true"}
    fixed = serving.app_builder({**args, "num_replicas": 2})._bound_deployment
    assert fixed.num_replicas == 2 and fixed.ray_actor_options["num_gpus"] == 0  # 'auto': the session has no GPU
    assert fixed.init_args[0].model == str(tiny_model_dir)


def test_predictions_equal_model_predict(base_url, served_model, faces):
    expected = expected_p_male(served_model, [data for _, data in faces])
    card = served_model[1].card
    with httpx.Client(base_url=base_url, timeout=120) as client:
        files = [("image", (name, data, "image/jpeg")) for name, data in faces]
        several = predict(client, files=files)
        raw = [predict(client, content=data, headers={"content-type": "image/jpeg"})[0] for _, data in faces[:2]]
    assert len(several) == len(faces)
    assert np.allclose([item["p_male"] for item in several], expected, atol=1e-5, rtol=0)
    assert np.allclose([item["p_male"] for item in raw], expected[:2], atol=1e-5, rtol=0)
    for item, p_male in zip(several, expected, strict=True):
        assert item["label"] == ("male" if p_male >= card.threshold else "female")
        assert item["model"] == card.name and item["latency_ms"] > 0 and item["batch_size"] >= 1


def test_health_card_docs_and_nothing_else(base_url, served_model):
    with httpx.Client(base_url=base_url, timeout=60) as client:
        assert client.get("/healthz").json() == {"status": "ready", "model": "googlenet_fine_tune"}
        assert client.get("/v1/model").json() == served_model[1].card.model_dump(mode="json")
        docs = client.get("/docs").text
        assert "swagger-ui" in docs and "http://" not in docs and "https://" not in docs  # no CDN: works offline
        assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
        assert "/v1/predict" in client.get("/openapi.json").json()["paths"]
        page = client.get("/")
        assert page.headers["content-type"].startswith("text/html") and 'type="file"' in page.text
        assert "http://" not in page.text and "https://" not in page.text  # no CDN: the page is self-contained
        for path in ("/static/index.html", "/genderrec/serving.py", "/card.json", "/model.keras", "/%2e%2e/etc/passwd"):
            assert client.get(path).status_code == 404, path


@pytest.mark.parametrize(
    ("request_kwargs", "status", "detail"),
    [
        ({"content": b"some text", "headers": {"content-type": "text/plain"}}, 415, "content type 'text/plain'"),
        ({"files": {"image": ("notes.txt", b"some text", "text/plain")}}, 415, "'notes.txt'"),
        ({"content": b"not a picture at all", "headers": {"content-type": "image/png"}}, 422, "not an image"),
        ({"files": {"image": ("empty.jpg", b"", "image/jpeg")}}, 422, "'empty.jpg'.*empty file"),
        ({"content": png_with_declared_size(60_000, 60_000)}, 422, "decompression bomb"),
        ({"content": png_with_declared_size(10_000, 5_000)}, 422, "50 Mpx, over the limit of 40 Mpx"),
        ({"content": b""}, 400, "no image"),
        ({"data": {"image": "face.jpg"}}, 415, "x-www-form-urlencoded"),
        ({"files": {"image": (None, b"face.jpg")}}, 400, r"no image.*text fields \['image'\]"),
        ({"content": b"\0" * (10 * 1024 * 1024 + 1)}, 413, "over the limit of 10485760 bytes"),
        ({"content": iter([b"\0" * 4 * 1024 * 1024] * 3)}, 413, "over the limit of 10485760 bytes"),  # chunked
    ],
    ids=[
        "text-body",
        "text-file",
        "not-an-image",
        "empty-file",
        "bomb",
        "over-max-pixels",
        "empty-body",
        "urlencoded-form",
        "text-field-only",
        "body-over-10MB",
        "chunked-body-over-10MB",
    ],
)
def test_bad_input_gets_its_status_and_the_replica_stays_healthy(base_url, faces, request_kwargs, status, detail):
    with httpx.Client(base_url=base_url, timeout=120) as client:
        response = client.post("/v1/predict", **request_kwargs)
        assert response.status_code == status, response.text
        assert re.search(detail, response.json()["detail"]), response.json()
        assert len(predict(client, content=faces[0][1])) == 1
        assert client.get("/healthz").status_code == 200


def test_truncated_image_among_good_ones_is_named(base_url, faces):
    name, data = faces[0]
    files = [("image", (name, data, "image/jpeg")), ("image", ("cut.jpg", data[: len(data) // 2], "image/jpeg"))]
    with httpx.Client(base_url=base_url, timeout=120) as client:
        response = client.post("/v1/predict", files=files)
        assert response.status_code == 422
        assert "file 'cut.jpg' (field 'image'): corrupt or truncated image" in response.json()["detail"]
        assert len(predict(client, files=files[:1])) == 1


def test_32_concurrent_requests_all_succeed_and_are_batched(base_url, served_model, faces):
    expected = dict(
        zip([name for name, _ in faces], expected_p_male(served_model, [data for _, data in faces]), strict=True)
    )
    requests = [faces[index % len(faces)] for index in range(32)]

    async def send_all():
        async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
            return await asyncio.gather(*(client.post("/v1/predict", content=data) for _, data in requests))

    responses = asyncio.run(send_all())
    assert [response.status_code for response in responses] == [200] * 32
    answers = [response.json()["predictions"][0] for response in responses]
    for (name, _), answer in zip(requests, answers, strict=True):
        assert answer["p_male"] == pytest.approx(expected[name], abs=1e-5)  # batching never mixes up answers
    batch_sizes = [answer["batch_size"] for answer in answers]
    print(f"batch sizes seen by 32 concurrent requests: {sorted(batch_sizes)}")
    assert max(batch_sizes) > 1 and max(batch_sizes) <= 8


def test_face_settings_are_checked(tiny_model_dir):
    settings = serving.settings(str(SERVE_CONFIG), ["faces=auto", "max_faces=3"], model=str(tiny_model_dir))
    assert (settings.args.faces, settings.args.max_faces, settings.args.min_face_size) == ("auto", 3, 20)
    with pytest.raises(ValueError, match="max_faces"):
        serving.ServeArgs(model="m", max_faces=0)
    with pytest.raises(ValueError, match="'aligned', 'detect' or 'auto'"):
        serving.ServeArgs(model="m", faces="all")


def test_faces_detect_and_auto_return_each_face_with_its_box(base_url, served_model, celeba_dir):
    served = served_model[1]
    card, size = served.card, served.card.input_size
    group, single = layout(celeba_dir, "three-faces-exif"), layout(celeba_dir, "one-face")
    files = [
        ("image", (name, data, "image/jpeg"))
        for name, data in [("group.jpg", group.data), ("nobody.jpg", no_face_photo()), ("single.jpg", single.data)]
    ]
    with httpx.Client(base_url=base_url, timeout=120) as client:
        detect = client.post("/v1/predict", params={"faces": "detect"}, files=files)
        auto = client.post("/v1/predict?faces=auto", content=no_face_photo(), headers={"content-type": "image/jpeg"})
        aligned = predict(client, content=no_face_photo())
        wrong = client.post("/v1/predict?faces=all", content=single.data)
    assert detect.status_code == 200, detect.text
    body = detect.json()
    assert body["faces"] == "detect" and body["model"] == card.name and body["latency_ms"] > 0
    group_result, nobody, single_result = body["images"]
    assert group_result["image"] == "file 'group.jpg' (field 'image')"
    assert (group_result["width"], group_result["height"]) == (720, 480)  # upright: EXIF applied
    assert nobody["faces"] == [] and nobody["error"] == NO_FACE
    for composite, result in ((group, group_result), (single, single_result)):
        found = result["faces"]
        assert result["error"] is None and [face["face_index"] for face in found] == list(range(len(composite.boxes)))
        boxes = [face["box"] for face in found]
        for known, index in zip(composite.boxes, match(boxes, composite.boxes), strict=True):
            assert iou(boxes[index], known) >= 0.5
        crops = face_crops(images.decode_image(composite.data), detector(), FaceOptions(), "detect", size)
        expected = served.predict_proba(np.stack([c.pixels for c in crops]))
        np.testing.assert_allclose([face["p_male"] for face in found], expected, atol=1e-5)
        np.testing.assert_allclose([face["landmarks"] for face in found], [c.face.landmarks for c in crops], atol=1e-3)
        for face in found:
            assert face["face_source"] == "detected" and face["det_confidence"] >= 0.9 and face["batch_size"] >= 1
            assert face["label"] == ("male" if face["p_male"] >= card.threshold else "female")

    assert auto.status_code == 200, auto.text
    (whole,) = auto.json()["images"][0]["faces"]
    assert whole["face_source"] == "whole_image" and whole["box"] is None and auto.json()["images"][0]["error"] is None
    assert whole["p_male"] == pytest.approx(aligned[0]["p_male"], abs=1e-6)  # the whole image, as ?faces=aligned
    assert wrong.status_code == 422 and "'aligned', 'detect' or 'auto'" in wrong.text


def test_page_in_headless_chromium(base_url, faces, celeba_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    face = celeba_dir / "img_align_celeba" / faces[0][0]
    with httpx.Client(base_url=base_url, timeout=120) as client:
        expected_label = predict(client, content=face.read_bytes())[0]["label"]
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("not a photo")
    with chromium(tmp_path / "chromium-profile") as driver:
        driver.get(base_url + "/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: "googlenet_fine_tune" in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "file").send_keys(str(face))
        wait.until(lambda d: d.find_element(By.ID, "label").text)
        assert driver.find_element(By.ID, "label").text == expected_label
        assert driver.find_element(By.ID, "preview").is_displayed()
        bar_width = driver.execute_script("return document.getElementById('bar-male').style.width")
        assert bar_width.endswith("%") and 0 <= float(bar_width[:-1]) <= 100
        assert driver.find_element(By.ID, "error").text == ""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        screenshot = ARTIFACTS / "page.png"
        driver.save_screenshot(str(screenshot))
        print(f"screenshot of the page: {screenshot}")

        driver.find_element(By.ID, "file").send_keys(str(not_an_image))
        wait.until(lambda d: d.find_element(By.ID, "error").text)
        error = driver.find_element(By.ID, "error").text
        assert "notes.txt" in error and "HTTP 415" in error and "not an image" in error
        driver.save_screenshot(str(ARTIFACTS / "page-error.png"))

        # The API docs render offline (Swagger UI from the installed package) and list the predict endpoint.
        driver.get(base_url + "/docs")
        wait.until(lambda d: "/v1/predict" in [e.text for e in d.find_elements(By.CLASS_NAME, "opblock-summary-path")])
        driver.save_screenshot(str(ARTIFACTS / "docs.png"))


def test_page_draws_each_face_with_its_label(base_url, celeba_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    composite = layout(celeba_dir, "three-faces-exif")  # stored sideways: the browser must turn it upright too
    photo = tmp_path / "group.jpg"
    photo.write_bytes(composite.data)
    with httpx.Client(base_url=base_url, timeout=120) as client:
        response = client.post("/v1/predict?faces=detect", content=composite.data)
    expected = response.json()["images"][0]
    with chromium(tmp_path / "chromium-profile") as driver:
        driver.get(base_url + "/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: "googlenet_fine_tune" in d.find_element(By.ID, "model").text)
        Select(driver.find_element(By.ID, "mode")).select_by_value("detect")
        driver.find_element(By.ID, "file").send_keys(str(photo))
        wait.until(lambda d: len(d.find_elements(By.CLASS_NAME, "face-box")) == len(composite.boxes))
        preview = driver.find_element(By.ID, "preview")
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", preview))
        natural = driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", preview)
        assert natural == [expected["width"], expected["height"]]
        image = preview.rect
        scale = image["width"] / expected["width"]
        for element in driver.find_elements(By.CLASS_NAME, "face-box"):
            face = expected["faces"][int(element.get_attribute("data-face-index"))]
            left, top, right, bottom = (value * scale for value in face["box"])
            drawn = element.rect
            assert element.is_displayed()
            assert drawn["x"] == pytest.approx(image["x"] + left, abs=2) and drawn["y"] == pytest.approx(
                image["y"] + top, abs=2
            )
            assert drawn["width"] == pytest.approx(right - left, abs=2)
            assert drawn["height"] == pytest.approx(bottom - top, abs=2)
            percent = f"{100 * face['p_male']:.1f}%"
            assert element.text == f"{face['face_index']}: {face['label']}, p(male) {percent}"
        assert len(driver.find_elements(By.CSS_SELECTOR, "#faces li")) == len(composite.boxes)
        assert driver.find_element(By.ID, "error").text == ""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "page-faces.png"))
