"""Training input on a real local Ray: the decoded faces, their order per epoch, and the cache decision."""

import time

import numpy as np
import pytest

from genderrec import images, train_data
from genderrec.config import parse_config
from tests.conftest import TINY_SIZE


def expected_pixels(faces) -> np.ndarray:
    return np.stack(
        [images.load_image(open(uri, "rb").read(), TINY_SIZE).astype(np.uint8) for uri in faces["image_uri"]]
    )


def positions(batches, expected: np.ndarray) -> list[int]:
    """Which expected face each yielded image is (they must all be decoded exactly as the shared decoder does)."""
    found = []
    for pixels, _ in batches:
        for image in pixels:
            matches = np.flatnonzero((expected == image).all(axis=(1, 2, 3)))
            assert len(matches) == 1, "an image was not decoded exactly as load_image does"
            found.append(int(matches[0]))
    return found


def test_train_split_streams_in_a_new_order_every_epoch_then_from_its_uint8_cache(ray_session, real_faces):
    faces = real_faces.head(24)
    expected = expected_pixels(faces)
    ds = train_data.dataset(faces, TINY_SIZE, decode_cpus=0.05, shuffle_seed=3)

    streamed = train_data.SplitBatches(ds.iterator(), 24, TINY_SIZE, 8, cache=False, shuffle=True, seed=3)
    first, second = positions(streamed.epoch(0), expected), positions(streamed.epoch(1), expected)
    assert sorted(first) == sorted(second) == list(range(24))
    assert first != second  # the URIs were reshuffled before decoding

    cached = train_data.SplitBatches(ds.iterator(), 24, TINY_SIZE, 8, cache=True, shuffle=True, seed=3)
    epochs = [list(cached.epoch(epoch)) for epoch in range(3)]
    assert cached.filled and cached.pixels.dtype == np.uint8
    orders = [positions(batches, expected) for batches in epochs]
    assert all(sorted(order) == list(range(24)) for order in orders)
    assert orders[1] != orders[2]  # a new permutation of the cached pixels every epoch
    labels = dict(zip(range(24), faces["male"], strict=True))
    for batches, order in zip(epochs, orders, strict=True):
        assert np.concatenate([y for _, y in batches]).tolist() == [labels[index] for index in order]


def test_validation_input_is_one_whole_pass_for_each_iterator(ray_session, real_faces):
    """Keras' ``evaluate`` makes a new iterator every epoch: each reads the split once to its end (streamed, then
    from the cache it filled)."""
    faces = real_faces.head(12)
    expected = expected_pixels(faces)
    val = train_data.SplitBatches(
        train_data.dataset(faces, TINY_SIZE, decode_cpus=0.05).iterator(),
        12,
        TINY_SIZE,
        5,
        cache=True,
        shuffle=False,
        seed=0,
    )
    data = train_data.keras_input(val, TINY_SIZE, endless=False)
    passes = [positions(((x.numpy().astype(np.uint8), y) for x, y in data), expected) for _ in range(2)]
    assert val.filled and sorted(passes[0]) == list(range(12)) and passes[1] == passes[0]
    # without autotuning, destroying an iterator does not wait for the tuner's sleep (up to a minute)
    assert data.options().autotune.enabled is False
    assert train_data.keras_input(val, TINY_SIZE).options().autotune.enabled is not False


def test_training_ingest_keeps_the_dataset_order_whatever_the_decode_timing(ray_session):
    """What reaches the worker follows the (seeded) dataset order, not the order its tasks finish in: a run is
    reproducible from ``data.seed``."""
    import ray.data

    def slow_first_blocks(batch: dict) -> dict:  # a decode stand-in: finished in turn, blocks would come in reverse
        time.sleep(0.1 * (8 - int(batch["id"][0]) // 4))
        return batch

    ds = ray.data.range(32, override_num_blocks=8).map_batches(slow_first_blocks, batch_size=4, num_cpus=0.1)
    (shards,) = train_data.data_config().configure(
        {"train": ds}, world_size=1, worker_handles=None, worker_node_ids=None
    )
    for _ in range(2):
        ids = [int(row["id"]) for row in shards["train"].iter_rows()]
        assert ids == list(range(32))


def test_a_bad_file_fails_the_epoch_naming_it(ray_session, tmp_path, real_faces):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    faces = real_faces.head(2).assign(image_uri=[real_faces["image_uri"].iloc[0], str(bad)])
    batches = train_data.SplitBatches(
        train_data.dataset(faces, TINY_SIZE, decode_cpus=0.05).iterator(),
        2,
        TINY_SIZE,
        2,
        cache=False,
        shuffle=False,
        seed=0,
    )
    with pytest.raises(Exception, match="broken.jpg"):
        list(batches.epoch(0))


def config(**data):
    return parse_config({"data": {"manifest": "m", "image_size": [218, 178], **data}})


def test_auto_caches_only_what_fits_the_budget():
    image = 218 * 178 * 3
    fits = train_data.plan_cache(config(), 10_000, 16 * 2**30, "resources.memory_per_run_gib")
    assert fits.cache_bytes == 10_000 * image and fits.budget == 8 * 2**30 and fits.cache
    too_big = train_data.plan_cache(config(), 162_770, 16 * 2**30, "resources.memory_per_run_gib")
    assert too_big.cache_bytes > too_big.budget and not too_big.cache
    tighter = train_data.plan_cache(config(cache_budget_fraction=0.05), 10_000, 16 * 2**30, "test")
    assert not tighter.cache  # 1.1 GiB of pixels against 0.8 GiB
    assert not train_data.plan_cache(config(), 10, None, "unknown").cache
    assert not train_data.plan_cache(config(cache="none"), 10, 16 * 2**30, "test").cache

    report = too_big.describe()
    for number in ("162,770 images", "218x178", "17.65 GiB", "budget 8.00 GiB = 0.5 x 16.00 GiB", "-> stream"):
        assert number in report, report


def test_cache_memory_that_cannot_fit_fails_before_training_with_the_numbers():
    assert train_data.plan_cache(config(cache="memory"), 1_000, 16 * 2**30, "test").cache
    with pytest.raises(train_data.CacheError, match=r"162,770 images.*17.65 GiB.*budget 8.00 GiB"):
        train_data.plan_cache(config(cache="memory"), 162_770, 16 * 2**30, "test")


def test_prepare_prints_the_estimate_and_decision(capsys, real_faces):
    cfg = parse_config(
        {
            "data": {"manifest": "m", "image_size": list(TINY_SIZE)},
            "resources": {"memory_per_run_gib": 1},
        }
    )
    frame = real_faces.assign(split=["train"] * 40 + ["val"] * 10 + ["test"] * 10)
    inputs = train_data.prepare(cfg, frame)
    assert inputs.cache and inputs.counts() == {"train": 40, "val": 10}
    printed = capsys.readouterr().out
    assert "50 images (train + val) of 40x32" in printed and "resources.memory_per_run_gib" in printed
    assert "-> cache the uint8 pixels" in printed


def test_attribute_targets_travel_with_their_faces_streamed_and_cached(ray_session, real_faces):
    faces = real_faces.head(24)
    attributes = ("Eyeglasses", "Smiling", "Wearing_Lipstick")
    expected = expected_pixels(faces)
    ds = train_data.dataset(faces, TINY_SIZE, decode_cpus=0.05, shuffle_seed=3, attributes=attributes)
    (block,) = ds.limit(4).iter_batches(batch_size=4, batch_format="numpy")
    assert block["attributes"].dtype == np.uint8 and block["attributes"].shape == (4, 3)

    targets = train_data.Targets(male=True, columns=(2, 0))  # male, Wearing_Lipstick, Eyeglasses
    wanted = faces[["male", "Wearing_Lipstick", "Eyeglasses"]].to_numpy(np.float32)
    batches = train_data.SplitBatches(
        ds.iterator(), 24, TINY_SIZE, 8, cache=True, shuffle=True, seed=3, targets=targets
    )
    for epoch in range(2):  # streamed, then from the cache
        labels = [(positions([(x, y)], expected), y) for x, y in batches.epoch(epoch)]
        assert all(y.shape[1] == 3 and y.dtype == np.float32 for _, y in labels)
        order = [index for found, _ in labels for index in found]
        np.testing.assert_array_equal(np.concatenate([y for _, y in labels]), wanted[order])
    assert batches.filled and batches.labels.shape == (24, 3)

    only = train_data.Targets(male=False, columns=(1,))
    (pixels, y), *_ = train_data.SplitBatches(
        ds.iterator(), 24, TINY_SIZE, 24, cache=False, shuffle=False, seed=0, targets=only
    ).epoch(0)
    np.testing.assert_array_equal(y[:, 0], faces["Smiling"].to_numpy(np.float32)[positions([(pixels, y)], expected)])


def last_line_of(script: str, extra_env: dict) -> str:
    """The last line ``script`` prints in a fresh Python started with ``extra_env`` instead of our malloc settings:
    glibc reads them only as a process starts."""
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")} | extra_env
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600, check=True
    )
    return done.stdout.strip().splitlines()[-1]


FAULTS_PER_STEP = """
import resource, sys
import numpy as np
from genderrec import engines, models, train_data, training
from genderrec.config import parse_config

class ArrayBatches:  # SplitBatches' interface over arrays in memory: keras_input's from_generator is what matters
    targets = train_data.Targets()
    def __init__(self, pixels, labels):
        self.pixels, self.labels = pixels, labels
    def epoch(self, epoch):
        for start in range(0, len(self.labels), 32):
            yield self.pixels[start : start + 32], self.labels[start : start + 32]

engines.limit_tensorflow_threads(1)
size = (32, 32)
cfg = parse_config({"data": {"manifest": "unused", "image_size": list(size)}, "training": {"batch_size": 32}})
model = models.build_model("resnet50", "fine_tune", size, "none")
training.compile_model(model, cfg, steps_per_epoch=8)
rng = np.random.default_rng(0)
batches = ArrayBatches(rng.integers(0, 256, (256, *size, 3), dtype=np.uint8), rng.integers(0, 2, 256).astype("float32"))
data = train_data.keras_input(batches, size)
model.fit(data, epochs=1, steps_per_epoch=8, verbose=0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
model.fit(data, epochs=3, initial_epoch=1, steps_per_epoch=8, verbose=0)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 16)
"""


def test_a_training_worker_does_not_fault_its_tensors_in_again_every_step():
    """Started with ``training.WORKER_ENV`` (as Ray Train starts the workers), a Keras fit over ``keras_input`` does
    not fault its tensors in afresh every step: when malloc mmaps them anew, ResNet50 at 32x32 faulted about 73,500
    times a step (docs/train_throughput.md); with the fix, dozens. glibc's defaults alone differ between machines
    (a CI machine faulted 123 times a step without WORKER_ENV), so only the worker's environment is asserted."""
    from genderrec import training

    faults = float(last_line_of(FAULTS_PER_STEP, training.WORKER_ENV))
    assert faults < 2_000, f"{faults:.0f} minor page faults a step with WORKER_ENV: its tensors are mmapped anew"


MMAPPED_CHUNKS = """
import ctypes
import numpy as np
import tensorflow as tf
from genderrec import train_data

class OneBatch:  # SplitBatches' interface over one array in memory
    targets = train_data.Targets()
    def epoch(self, epoch):
        yield np.zeros((1, 2, 2, 3), np.uint8), np.zeros(1, np.float32)

class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2: hblks counts the chunks malloc got from mmap
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2

def mmapped_by_a_9_mib_array():
    before = mallinfo2().hblks
    held = np.ones(9 * 2**20, dtype=np.uint8)  # the size of the kernel copies a ResNet50 backward pass makes
    return mallinfo2().hblks - before

plain = tf.data.Dataset.from_generator(lambda: iter([np.zeros(2)]), output_signature=tf.TensorSpec((2,), tf.float64))
next(iter(plain))  # builds the generator's kernel: TensorFlow sets malloc's mmap threshold to 128 KiB
patched = mmapped_by_a_9_mib_array()
next(iter(train_data.keras_input(OneBatch(), (2, 2))))  # its kernel lowers it again; its generator restores it
print(patched, mmapped_by_a_9_mib_array())
"""


def test_the_training_input_restores_the_mmap_threshold_that_tf_data_generators_lower():
    """Under Python 3.11 a ``from_generator`` dataset makes every allocation over 128 KiB a fresh mmap (a 9 MiB array
    faulted in again each time: 261-772 faults an array here, 2026-12-02); once ``keras_input``'s generator has
    started, the same array comes from malloc's heap. glibc's own count of mmapped chunks tells which, where fault
    counts vary with what the heap happens to hold."""
    from genderrec import training

    patched, restored = (int(value) for value in last_line_of(MMAPPED_CHUNKS, training.WORKER_ENV).split())
    assert patched == 1, f"tf.data no longer lowers the mmap threshold (a 9 MiB array made {patched} mmapped chunks)"
    assert restored == 0, f"the threshold was not restored: a 9 MiB array was still mmapped ({restored} chunks)"
