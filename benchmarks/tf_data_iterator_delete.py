"""How long deleting a tf.data iterator takes, with and without tf.data's autotuning, used as Keras' ``evaluate``
uses its validation input: read to its end, left alone while a training epoch runs, then deleted (``evaluate`` makes a
new iterator every epoch). With autotuning, deletion waits for the tuner thread's sleep, up to a minute; a training
run showed it as epochs 55 s slower than the rest, with the CPUs idle (docs/local_resnet50.md, 2026-12-03).

    python benchmarks/tf_data_iterator_delete.py --idle-s 70 --trials 3
"""

import argparse
import time

import numpy as np


def pipeline(autotune: bool):
    """A small one-pass input like ``train_data.keras_input``'s: from a generator, a cast, a fixed prefetch."""
    import tensorflow as tf

    def generate():
        for _ in range(200):
            yield np.zeros((4, 8), np.uint8)

    ds = tf.data.Dataset.from_generator(generate, output_signature=tf.TensorSpec((4, 8), tf.uint8))
    ds = ds.map(lambda x: tf.cast(x, tf.float32)).prefetch(2)
    if not autotune:
        options = tf.data.Options()
        options.autotune.enabled = False
        ds = ds.with_options(options)
    return ds


def deletion_seconds(autotune: bool, idle_s: float) -> float:
    iterator = iter(pipeline(autotune))
    for _ in iterator:
        pass
    time.sleep(idle_s)
    started = time.monotonic()
    del iterator
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-s", type=float, default=70.0, help="seconds between the end of a pass and deletion")
    parser.add_argument("--trials", type=int, default=3, help="deletions with and without autotuning, alternating")
    args = parser.parse_args()
    for trial in range(args.trials):
        for autotune in (True, False):
            seconds = deletion_seconds(autotune, args.idle_s)
            print(
                f"trial {trial + 1}, autotune {'on ' if autotune else 'off'}: deleting took {seconds:.2f} s", flush=True
            )


if __name__ == "__main__":
    main()
