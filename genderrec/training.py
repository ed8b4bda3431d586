"""One training run as a Ray Train loop, and the Tune grid that runs every (architecture, mode) at once.

Each run is a ``TensorflowTrainer`` with one worker (Keras 3 has no multi-worker strategy), fed the job's Ray Data
datasets (:mod:`genderrec.train_data`: decoded on any CPU, streamed or cached as the numbers allow). Every epoch
the worker reports its metrics and a checkpoint (the model with optimizer state plus a small JSON of
history and early-stopping state), so a killed worker resumes from its last epoch. Ray keeps the best
checkpoint by the monitored metric: that is the run's best model ("restore best weights"). A finished run leaves
its summary next to its checkpoints, so a rerun of a killed job does not train it again.

With ``models.weights: attributes`` a first grid of the same runs, one per backbone, learns the manifest's other
attributes instead of p(male) (task ``attributes``) and saves each backbone as a weights file in the run
directory, keyed on architecture, image size, data and recipe: the ten runs start from it, and a later job with
the same key reuses it. Auxiliary attribute heads are the same run with extra targets (task ``male``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from genderrec import engines, images, manifest, storage, train_data, train_faces
from genderrec.config import Config, parse_config

MODEL_FILE = "model.keras"
STATE_FILE = "state.json"
SUMMARY_FILE = "summary.json"  # next to a Ray Train run's checkpoints once it has finished
PRETRAIN_DIR = "pretrain"  # <run_dir>/pretrain/<key>/ (Ray Train run) and <key>.weights.h5 (the backbone)
# A training worker's environment. glibc gives TensorFlow's compute threads in a process that also runs Python (the
# tf.data generator over the dataset shard) their own malloc arenas and gives those back to the kernel after each
# step, so every step faulted its tensors' pages in afresh: 73,000 minor page faults a step and 0.40 s against 0.30
# s for ResNet50 at 40x32 (0.99 against 0.90 at 96x80), a third of the worker's CPU in the kernel. Keeping 64 MiB
# at the top of each arena when it is trimmed stops it (benchmarks/train_step_faults.py), together with
# train_data.restore_mmap_threshold (keras_input's generator calls it), which undoes the 128 KiB mmap threshold
# tf.data's generator sets.
WORKER_ENV = {"MALLOC_TOP_PAD_": str(64 * 2**20)}


def class_weights(labels) -> dict[int, float]:
    """Balanced class weights (as scikit-learn's ``compute_class_weight('balanced')``)."""
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.asarray(labels).astype(int)
    weights = compute_class_weight("balanced", classes=np.array([0, 1]), y=labels)
    return {0: float(weights[0]), 1: float(weights[1])}


def monitor_mode(metric: str) -> str:
    return "min" if "loss" in metric else "max"


def compile_model(
    model,
    cfg: Config,
    steps_per_epoch: int,
    aux_loss_weight: float | None = None,
    architecture: str = "",
    mode: str | None = None,
) -> None:
    """Adam (or AdamW with weight decay) at the run's learning rate, optional warmup+cosine schedule, BCE, accuracy
    and ROC-AUC.

    With ``aux_loss_weight`` the model's output is p(male) then attributes: the loss adds the attributes' mean BCE
    so weighted, and accuracy and ROC-AUC stay those of p(male)."""
    import keras

    from genderrec import models

    training = cfg.training
    rate = learning_rate = training.learning_rate_for(architecture, mode)
    if training.schedule == "cosine":
        warmup_steps = training.warmup_epochs * steps_per_epoch
        learning_rate = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup_steps else rate,
            decay_steps=max(1, training.epochs * steps_per_epoch - warmup_steps),
            warmup_target=rate if warmup_steps else None,
            warmup_steps=warmup_steps,
        )
    if training.weight_decay:
        optimizer = keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=training.weight_decay)
    else:
        optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
    if aux_loss_weight is None:
        loss = keras.losses.BinaryCrossentropy(label_smoothing=training.label_smoothing)
        metrics = [keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")]
    else:
        loss = models.AuxiliaryLoss(aux_loss_weight, label_smoothing=training.label_smoothing)
        metrics = [models.MaleAccuracy(name="accuracy"), models.MaleAUC(name="auc")]
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics)


def _report_callback(cfg: Config, state: dict):
    """A Keras callback that reports every epoch to Ray Train with a checkpoint, and does early stopping."""
    import keras
    import ray.train

    monitor = cfg.training.early_stopping.monitor if cfg.training.early_stopping else "val_accuracy"
    patience = cfg.training.early_stopping.patience if cfg.training.early_stopping else None
    better = (lambda a, b: a < b) if monitor_mode(monitor) == "min" else (lambda a, b: a > b)

    class ReportCheckpoint(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            metrics = {key: float(value) for key, value in (logs or {}).items()}
            if monitor not in metrics:
                raise ValueError(f"early_stopping.monitor {monitor!r} is not a reported metric: {sorted(metrics)}")
            metrics["epoch_seconds"] = time.perf_counter() - self.started
            state["train_seconds"] += metrics["epoch_seconds"]
            state["epoch"] = epoch + 1
            state["history"].append({"epoch": epoch + 1, **metrics})
            if state["best"] is None or better(metrics[monitor], state["best"]):
                state["best"], state["best_epoch"], state["wait"] = metrics[monitor], epoch + 1, 0
            else:
                state["wait"] += 1
            if patience is not None and state["wait"] >= patience:
                self.model.stop_training = True
            with tempfile.TemporaryDirectory(prefix="genderrec-ckpt-") as tmp:
                self.model.save(os.path.join(tmp, MODEL_FILE))
                Path(tmp, STATE_FILE).write_text(json.dumps(state))
                ray.train.report(
                    {**metrics, "epoch": epoch + 1, "train_seconds": state["train_seconds"]},
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                )

    return ReportCheckpoint()


def train_run(loop_config: dict) -> dict:
    """Ray Train worker loop for one (architecture, mode); returns the run's history and state."""
    import keras
    import ray.train

    from genderrec import models

    cfg = parse_config(loop_config["config"])
    architecture, mode = loop_config["architecture"], loop_config["mode"]
    targets = train_data.Targets(loop_config["targets"]["male"], tuple(loop_config["targets"]["columns"]))
    engines.limit_tensorflow_threads(loop_config["cpus"])
    keras.utils.set_random_seed(cfg.training_seed)
    # This worker process is the run's own. The policy is set before the model is built or loaded: compile wraps the
    # optimizer in a LossScaleOptimizer for mixed_float16, and a resumed run gets its loss-scale state back only so.
    keras.config.set_dtype_policy(cfg.training.precision)
    counts = loop_config["counts"]
    steps_per_epoch = cfg.training.steps_per_epoch or train_data.steps(counts["train"], cfg.training.batch_size)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            model = keras.saving.load_model(os.path.join(directory, MODEL_FILE))
            state = json.loads(Path(directory, STATE_FILE).read_text())
        state["resumed_at_epochs"].append(state["epoch"])
    else:
        model = models.build_model(
            architecture,
            mode,
            cfg.data.image_size,
            loop_config["weights"],
            cfg.models.head,
            male=targets.male,
            attributes=len(targets.columns),
        )
        compile_model(model, cfg, steps_per_epoch, loop_config["aux_loss_weight"], architecture, mode)
        state = {"epoch": 0, "history": [], "best": None, "best_epoch": 0, "wait": 0, "train_seconds": 0.0}
        state["resumed_at_epochs"] = []
    stopped_early = cfg.training.early_stopping and state["wait"] >= cfg.training.early_stopping.patience
    if state["epoch"] < cfg.training.epochs and not stopped_early:
        shards = {split: ray.train.get_dataset_shard(split) for split in counts if counts[split]}
        train_input, val_input = train_data.worker_inputs(
            shards,
            counts,
            cfg,
            cache=loop_config["cache"],
            first_epoch=state["epoch"],
            augment=images.augmentation(**cfg.augment.model_dump(), seed=cfg.training_seed),
            targets=targets,
            class_weight={int(label): weight for label, weight in loop_config["class_weight"].items()}
            if loop_config["class_weight"]
            else None,
        )
        model.fit(
            train_input,
            validation_data=val_input,
            epochs=cfg.training.epochs,
            initial_epoch=state["epoch"],
            steps_per_epoch=steps_per_epoch,
            callbacks=[_report_callback(cfg, state)],
            verbose=2,
        )
    return {**state, **models.parameter_counts(models.served(model))}


def task_targets(cfg: Config, task: str, inputs: train_data.RunInputs) -> train_data.Targets:
    """Task ``male``: p(male), with ``models.aux_attributes`` as extra outputs; ``attributes``: every attribute the
    datasets carry (pretraining), without ``male``."""
    if task == "attributes":
        return train_data.Targets(male=False, columns=tuple(range(len(inputs.attributes))))
    aux = cfg.models.aux_attributes
    names = inputs.attributes if aux == "all" else aux
    missing = [name for name in names if name not in inputs.attributes]
    if missing:
        raise ValueError(f"models.aux_attributes {missing} are not among the datasets' attributes {inputs.attributes}")
    return train_data.Targets(columns=tuple(inputs.attributes.index(name) for name in names))


def make_trainer(
    cfg: Config,
    architecture: str,
    mode: str,
    inputs: train_data.RunInputs,
    storage_path: str,
    name: str,
    *,
    task: str = "male",
    weights: str | None = None,
):
    """The Ray Train trainer for one run (one worker, one GPU on a cluster), fed the job's Ray Data datasets.

    ``weights``: the backbone's source (default ``models.weights``; ``attributes`` resolved to its file)."""
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    monitor = cfg.training.early_stopping.monitor if cfg.training.early_stopping else "val_accuracy"
    fs, path = ray_storage(storage_path)
    balanced = cfg.training.class_weight == "balanced" and task == "male"
    targets = task_targets(cfg, task, inputs)
    weights = weights or cfg.models.weights_for(architecture)
    if weights == "attributes":
        raise ValueError(f"{architecture}: models.weights 'attributes' needs the pretrained file (run_grid makes it)")
    return TensorflowTrainer(
        train_run,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "architecture": architecture,
            "mode": mode,
            "weights": weights,
            "targets": {"male": targets.male, "columns": list(targets.columns)},
            "aux_loss_weight": cfg.models.aux_loss_weight if targets.male and targets.columns else None,
            "counts": inputs.counts(),
            "cache": inputs.cache,
            "class_weight": class_weights(inputs.rows["train"]["male"]) if balanced else None,
            "cpus": cfg.resources.cpus_per_run,
        },
        datasets=inputs.datasets,
        dataset_config=train_data.data_config(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=1,
            use_gpu=cfg.resources.use_gpu,
            resources_per_worker={"CPU": cfg.resources.cpus_per_run},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            worker_runtime_env={"env_vars": WORKER_ENV},
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.resources.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=monitor, checkpoint_score_order=monitor_mode(monitor)
            ),
        ),
    )


def ray_storage(uri: str):
    """(filesystem, path) for Ray's ``storage_path``: S3 goes through our filesystem so endpoint overrides apply."""
    if storage.is_s3(uri):
        return storage.filesystem(uri)
    return None, str(Path(uri).absolute())


def run_one(
    cfg: Config,
    architecture: str,
    mode: str,
    inputs: train_data.RunInputs,
    storage_path: str,
    *,
    task: str = "male",
    weights: str | None = None,
    name: str | None = None,
) -> dict:
    """Train one run to the end and summarise it (best checkpoint, history, timings); ``task``, ``weights``: as
    :func:`make_trainer`; ``name``: its folder under ``storage_path`` (default ``<architecture>_<mode>``).

    A rerun of the same job resumes: a run that finished there returns its saved summary without training again,
    and Ray Train continues an unfinished one (same name and storage) from its last checkpoint.
    """
    name = name or f"{architecture}_{mode}"
    done = storage.join(storage_path, name, SUMMARY_FILE)
    if storage.exists(done):
        return json.loads(storage.read_text(done))
    weights = weights or cfg.models.weights_for(architecture)
    trainer = make_trainer(cfg, architecture, mode, inputs, storage_path, name, task=task, weights=weights)
    result = trainer.fit()
    monitor = cfg.training.early_stopping.monitor if cfg.training.early_stopping else "val_accuracy"
    best = result.get_best_checkpoint(monitor, monitor_mode(monitor))
    state = result.return_value
    summary = {
        "architecture": architecture,
        "mode": mode,
        "weights_uri": weights,
        "checkpoint_uri": storage.S3_SCHEME + best.path if storage.is_s3(storage_path) else best.path,
        "history": state["history"],
        "epochs_run": state["epoch"],
        "best_epoch": state["best_epoch"],
        f"best_{monitor}": state["best"],
        "train_seconds": state["train_seconds"],
        "resumed_at_epochs": state["resumed_at_epochs"],
        "params_total": state["params_total"],
        "params_trainable": state["params_trainable"],
    }
    storage.write_text(done, json.dumps(summary))
    return summary


def attribute_names(cfg: Config, frame: pd.DataFrame, source: str) -> tuple[str, ...]:
    """The attribute columns the runs need (all for pretraining, else the auxiliary ones; none if neither): a
    manifest without them fails here, before any training, naming ``source``."""
    if not cfg.models.uses_attributes():
        return ()
    pretraining = any(cfg.models.weights_for(name) == "attributes" for name in cfg.models.architectures)
    return tuple(manifest.attribute_columns(frame, source, "all" if pretraining else cfg.models.aux_attributes))


def pretraining_config(cfg: Config, architecture: str) -> Config:
    """The recipe of attribute pretraining: the runs' own, for ``models.pretrain_epochs`` when set, early stopping
    on the validation loss (accuracy over 39 attributes sits near their base rates and stopped VGG19 after 4 of 6
    epochs in a make run), without augmentation unless ``models.pretrain_augment`` (docs/local_leaderboard.md)."""
    update = {"epochs": cfg.models.pretrain_epochs_for(architecture) or cfg.training.epochs}
    if cfg.training.early_stopping:
        update["early_stopping"] = cfg.training.early_stopping.model_copy(update={"monitor": "val_loss"})
    augment = cfg.augment if cfg.models.pretrain_augment else cfg.augment.off()
    return cfg.model_copy(update={"training": cfg.training.model_copy(update=update), "augment": augment})


def pretraining_digest(cfg: Config, inputs: train_data.RunInputs, architecture: str) -> str:
    """A hash of what attribute pretraining learns from (the train and val URIs and attribute labels, the crop and
    face alignment) and how (its recipe): with architecture and image size, the key of its weights files."""
    digest = hashlib.sha256()
    for split in train_data.SPLITS:
        digest.update(inputs.rows[split][["image_uri", *inputs.attributes]].to_csv(index=False).encode())
    recipe = pretraining_config(cfg, architecture)
    parts = [section.model_dump(mode="json") for section in (recipe.training, recipe.augment, recipe.models.head)]
    digest.update(json.dumps([*parts, recipe.data.crop_box, recipe.data.faces, recipe.training_seed]).encode())
    return digest.hexdigest()[:16]


def pretrain_attributes(cfg: Config, inputs: train_data.RunInputs, run_dir: str) -> dict[str, str]:
    """Each ``attributes`` backbone's weights file, pretrained now (in parallel, through the Tune grid) unless the
    run directory already has it; returns ``{architecture: weights file}``."""
    height, width = cfg.data.image_size
    wanted = {
        name: storage.join(
            run_dir, PRETRAIN_DIR, f"{name}_{height}x{width}_{pretraining_digest(cfg, inputs, name)}.weights.h5"
        )
        for name in cfg.models.architectures
        if cfg.models.weights_for(name) == "attributes"
    }
    missing = {name: uri for name, uri in wanted.items() if not storage.exists(uri)}
    for name in sorted(set(wanted) - set(missing)):
        print(f"attribute pretraining of {name}: reusing {wanted[name]}", flush=True)
    if missing:
        storage_path = storage.join(run_dir, PRETRAIN_DIR)

        def pretrain(params, inputs):
            architecture = params["architecture"]
            uri = missing[architecture]
            summary = run_one(
                pretraining_config(cfg, architecture),
                architecture,
                "fine_tune",
                inputs,
                storage_path,
                task="attributes",
                weights="none",
                name=uri.rsplit("/", 1)[-1].removesuffix(".weights.h5"),
            )
            from genderrec import models

            trained = models.load_model(storage.join(summary["checkpoint_uri"], MODEL_FILE))
            models.save_backbone_weights(trained, architecture, uri)
            return summary

        # In the config's order: list the slowest backbones first, so that the last ones to start are short.
        order = [name for name in cfg.models.architectures if name in missing]
        tune_grid(cfg, run_dir, "tune_pretrain", {"architecture": order}, pretrain, inputs)
    return wanted


def tune_grid(cfg: Config, run_dir: str, experiment: str, grid: dict[str, list], trial, inputs) -> list[dict]:
    """Run ``trial(params, inputs) -> summary`` for every point of ``grid`` concurrently with Ray Tune."""
    from ray import tune

    def report(params, inputs):
        tune.report({"summary": trial(params, inputs)})

    fs, path = ray_storage(run_dir)
    tuner = tune.Tuner(
        # with_parameters: the datasets' blocks go to the trials through the object store, not inside a closure
        tune.with_resources(tune.with_parameters(report, inputs=inputs), {"cpu": 0.01}),
        param_space={key: tune.grid_search(values) for key, values in grid.items()},
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.resources.max_concurrent_trials),
        run_config=tune.RunConfig(name=experiment, storage_path=path, storage_filesystem=fs, verbose=1),
    )
    results = tuner.fit()
    failed = [result for result in results if result.error]
    if failed:
        raise RuntimeError(f"{len(failed)} training run(s) failed; first error: {failed[0].error}")
    return [result.metrics["summary"] for result in results]


def run_grid(cfg: Config, frame: pd.DataFrame, run_dir: str, source: str = "the manifest") -> list[dict]:
    """Run every configured (architecture, mode) concurrently with Ray Tune; returns one summary per run.

    The attribute columns (``source`` names the manifest in errors) and the cache decision (and its estimate,
    printed) come first, so that a config that cannot run fails before any run; attribute pretraining comes next.
    """
    attributes = attribute_names(cfg, frame, source)
    if cfg.data.faces == "align":
        frame, _ = train_faces.attach(frame, run_dir)
    inputs = train_data.prepare(cfg, frame, attributes)
    weights = pretrain_attributes(cfg, inputs, run_dir)
    storage_path = storage.join(run_dir, "trainer")

    def trial(params, inputs):
        architecture, mode = params["architecture"], params["mode"]
        return run_one(cfg, architecture, mode, inputs, storage_path, weights=weights.get(architecture))

    grid = {"architecture": list(cfg.models.architectures), "mode": list(cfg.models.modes)}
    return tune_grid(cfg, run_dir, "tune", grid, trial, inputs)
