"""The package's shape: every module imports alone, imports follow the one-way table below (README: Architecture),
and TensorFlow's C++ start-up messages stay out of what genderrec prints."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "genderrec"

# module -> the genderrec modules it may import (anywhere in it, function bodies included). Data flows one way:
# manifest -> images -> bundle -> predictions (evaluation) -> metrics -> reports -> selection; cli and comparison
# (train_all) are entry points that nothing imports. The same table is in the README.
ALLOWED = {
    "tflogs": set(),
    "config": set(),
    "storage": set(),
    "metrics": set(),
    "manifest": {"storage", "config"},
    "images": {"storage"},
    "faces": {"images"},
    "models": {"storage", "config"},
    "train_faces": {"faces", "images", "storage"},
    "train_data": {"images", "storage", "config", "train_faces"},
    "training": {"manifest", "images", "models", "bundle", "config", "storage", "train_data", "engines"}
    | {"train_faces"},
    "engines": {"storage"},
    "bundle": {"models", "storage", "images", "metrics", "engines", "config"},
    "evaluation": {"bundle", "metrics", "images", "faces", "manifest", "storage"},
    "reports": {"storage", "images"},
    "selection": {"metrics", "bundle", "config"},
    "shards": {"storage"},
    "labeling": {"images", "faces", "bundle", "engines", "storage", "config", "metrics", "manifest", "shards"},
    "serving": {"images", "faces", "bundle", "engines", "storage", "config"},
    "comparison": {"config", "manifest", "training", "bundle", "evaluation", "metrics", "models", "reports"}
    | {"selection", "storage", "engines"},
    "cli": {"*"},
    "__main__": {"cli"},
    "__init__": {"tflogs"},
}
ENTRY_POINTS = {"cli", "comparison", "__main__"}


def modules() -> list[str]:
    return sorted(path.stem for path in PACKAGE.glob("*.py"))


def imported(module: str) -> set[str]:
    """The genderrec modules ``module`` imports, parsed from its source (``from genderrec import x`` counts x)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "genderrec":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("genderrec."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("genderrec.")}
    return found - {module}


def test_imports_follow_the_table_and_have_no_cycle():
    unlisted = set(modules()) - set(ALLOWED)
    assert not unlisted, f"new modules {sorted(unlisted)}: give each a row in ALLOWED and in the README's table"
    graph = {module: imported(module) for module in modules()}
    for module, imports in graph.items():
        allowed = ALLOWED[module]
        if "*" not in allowed:
            assert imports <= allowed, f"genderrec.{module} imports {sorted(imports - allowed)}"
        if module not in ENTRY_POINTS:
            assert not imports & ENTRY_POINTS, f"genderrec.{module} imports an entry point"

    def visit(module, path):
        assert module not in path, f"import cycle: {' -> '.join([*path, module])}"
        for dependency in graph[module]:
            visit(dependency, [*path, module])

    for module in graph:
        visit(module, [])


def test_readme_architecture_table_matches():
    readme = (REPO / "README.md").read_text()
    rows = {}
    for line in readme.split("## Architecture", 1)[1].split("\n## ", 1)[0].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") and cells[0] != "`module`":
            rows[cells[0].strip("`")] = {name.strip("` ") for name in cells[2].split(",")} - {"—", ""}
    for module, allowed in rows.items():
        assert module in ALLOWED and allowed == ({"everything"} if "*" in ALLOWED[module] else ALLOWED[module]), module
    assert set(modules()) - {"__main__", "__init__"} <= set(rows), "a module has no row in the README's table"


def test_every_module_imports_alone_and_says_what_it_owns():
    """Each module in a fresh interpreter (no other genderrec module imported first); a hidden cycle fails here."""

    def import_alone(module: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", f"import genderrec.{module}"],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=300,
        )

    alone = [module for module in modules() if module != "__main__"]  # __main__ runs the command line
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(alone, pool.map(import_alone, alone), strict=True))
    failed = {module: result.stderr[-2000:] for module, result in results.items() if result.returncode}
    assert not failed, failed
    for module in modules():
        docstring = ast.get_docstring(ast.parse((PACKAGE / f"{module}.py").read_text()))
        assert docstring and len(docstring.split()) >= 5, f"genderrec.{module}: no opening docstring"


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, celeba_manifest):
    """A small model directory and a manifest of 8 real val faces for `genderrec calibrate`."""
    import keras

    from genderrec import manifest
    from tests.helpers.bundles import save_bundle

    inputs = keras.Input((40, 32, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    folder = tmp_path_factory.mktemp("quiet")
    save_bundle(keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(pooled)), folder / "model")
    val = celeba_manifest[celeba_manifest["split"] == "val"].groupby("male").head(4)
    manifest.write_manifest(val, str(folder / "val.parquet"))
    return folder


TF_NOISE = ("oneDNN", "cuda", "TF-TRT", "absl::InitializeLog", "cpu_feature_guard")


def tf_notices(stderr: str) -> list[str]:
    """The lines of ``stderr`` that are TensorFlow's start-up notices."""
    return [line for line in stderr.splitlines() if any(word.lower() in line.lower() for word in TF_NOISE)]


def run_genderrec(args: list[str], **env) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("TF_", "GENDERREC_TF"))}
    return subprocess.run(
        [sys.executable, "-m", "genderrec", *args],
        cwd=REPO,
        env={**environment, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_tensorflow_start_up_messages_are_off_unless_asked_for(tiny_bundle):
    args = ["calibrate", "--model", str(tiny_bundle / "model"), "--manifest", str(tiny_bundle / "val.parquet")]
    quiet = run_genderrec(args)
    assert quiet.returncode == 0, quiet.stderr
    assert "temperature" in quiet.stdout
    assert tf_notices(quiet.stderr) == [], tf_notices(quiet.stderr)
    loud = run_genderrec(args, GENDERREC_TF_LOGS="1")
    # what the switch turns back on (and what was hidden): which notices TensorFlow prints depends on the machine
    # (oneDNN's on the CI machines, only CUDA's cuInit failure on another VM of the same kind, 2026-12-02)
    assert loud.returncode == 0 and tf_notices(loud.stderr), loud.stderr


def test_ray_workers_start_quiet_too(tmp_path):
    """Ray tasks that load TensorFlow, their workers' output forwarded to the driver: one through genderrec, one as
    Ray Train's workers do (``ray.train.tensorflow`` imports it before any genderrec code runs there)."""
    script = tmp_path / "worker.py"
    script.write_text(
        "import ray\n"
        "from genderrec import cli\n"
        "cli.init_ray()\n"
        "@ray.remote(max_calls=1)\n"  # each task in a fresh worker process
        "def load():\n"
        "    from genderrec import models\n"
        "    import keras\n"
        "    return keras.__version__\n"
        "@ray.remote(max_calls=1)\n"
        "def load_as_ray_train():\n"
        "    import ray.train.tensorflow\n"
        "    import tensorflow\n"
        "    return tensorflow.__version__\n"
        "print('keras', ray.get(load.remote()))\n"
        "print('tensorflow', ray.get(load_as_ray_train.remote()))\n"
    )
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("TF_", "GENDERREC_TF"))}
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env={**environment, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "local"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "keras 3." in result.stdout and "tensorflow 2." in result.stdout
    output = result.stdout + result.stderr
    noise = tf_notices(output)
    assert noise == [], noise
