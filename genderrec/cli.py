"""``genderrec`` subcommands: parse arguments, build the config, call the library (nothing else lives here)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time

from genderrec import engines, faces, storage, tflogs
from genderrec.config import ConfigError, load_config, read_yaml


def _storage_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (MinIO/Ceph/R2); default: AWS")
    parser.add_argument("--s3-region", help="S3 region")


def _face_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--faces",
        choices=faces.FACES_MODES,
        help="aligned: images are CelebA-like face crops (default); detect: find the faces in ordinary photos and "
        "classify each, aligned like CelebA (evaluate: the largest); auto: detect, else the whole image",
    )
    parser.add_argument(
        "--min-face-size", type=int, help="smaller faces (box's shorter side, px) are ignored (default 20)"
    )
    parser.add_argument("--min-face-confidence", type=float, help="less confident detections are ignored (default 0.9)")
    parser.add_argument("--max-faces", type=int, help="most faces per image, the largest kept (default 10)")


def _engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engine",
        choices=["auto", "tensorflow", "openvino"],
        help="auto (default): TensorFlow where Ray gives a GPU, OpenVINO on CPUs when the model has that export",
    )
    parser.add_argument("--precision", choices=["bf16", "f32"], help="OpenVINO precision (default bf16)")


def init_ray(address: str | None = None) -> None:
    """Connect to a cluster (``address``/``RAY_ADDRESS``, as under ``ray job submit``) or start a local one."""
    import ray

    if not ray.is_initialized():
        env_vars = {**tflogs.env_vars(), **storage.s3_env_vars()}  # workers on other nodes start quiet too
        # Every worker quiets TensorFlow as it starts: Ray Train's workers import it (ray.train.tensorflow) before
        # any genderrec code runs there.
        runtime_env = {"env_vars": env_vars, "worker_process_setup_hook": "genderrec.tflogs.install"}
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)


def cmd_prepare_celeba(args) -> int:
    from genderrec import manifest

    storage.configure_s3(args.s3_endpoint, args.s3_region)
    frame, skipped = manifest.build_manifest(
        args.celeba_dir,
        split=args.split,
        subset=args.subset,
        fractions=tuple(args.fractions),
        seed=args.seed,
        skip_missing=args.skip_missing,
    )
    manifest.write_manifest(frame, args.out, metadata={"genderrec.split": args.split, "genderrec.seed": str(args.seed)})
    if skipped:
        report = args.out + ".skipped.csv"
        import pandas as pd

        storage.write_text(report, pd.DataFrame(skipped).to_csv(index=False))
        print(f"skipped {len(skipped)} item(s), listed in {report}")
    counts = frame.groupby("split")["male"].agg(["count", "mean"]).round(3)
    print(f"wrote {args.out}: {len(frame)} images\n{counts.to_string()}")
    return 0


def cmd_train_all(args) -> int:
    from genderrec import comparison

    overrides = list(args.set or [])
    if args.celeba_dir:
        overrides.append(f"data.celeba_dir={storage.absolute(args.celeba_dir)}")
    if args.manifest:
        overrides.append(f"data.manifest={storage.absolute(args.manifest)}")
    if args.storage_path:
        overrides.append(f"run.storage_path={args.storage_path}")
    cfg = load_config(args.config, overrides)
    cfg = cfg.model_copy(
        update={"run": cfg.run.model_copy(update={"storage_path": storage.absolute(cfg.run.storage_path)})}
    )
    storage.configure_s3(cfg.storage.s3_endpoint, cfg.storage.s3_region)
    init_ray(cfg.resources.address)
    run_dir = comparison.train_all(cfg)
    print(storage.read_text(storage.join(run_dir, "leaderboard.md")))
    print(f"run directory: {run_dir}\nselected model: {storage.join(run_dir, 'selected')}")
    return 0


def _flags_over_config_file(args) -> dict:
    """The subcommand's settings: its ``--config`` YAML (keys are the flag names), then the flags given (they win).

    Flags default to None so that a flag left out never hides the file's value; unknown keys are errors.
    """
    flags = {key: value for key, value in vars(args).items() if key not in ("command", "func", "config")}
    values = read_yaml(args.config) if args.config else {}
    unknown = sorted(set(values) - set(flags))
    if unknown:
        raise ConfigError(f"{args.config}: unknown keys {unknown}; known: {sorted(flags)}")
    return {**values, **{key: value for key, value in flags.items() if value is not None}}


def cmd_label(args) -> int:
    import dataclasses

    from genderrec import labeling

    settings = _flags_over_config_file(args)
    missing = [f"--{key}" for key in ("model", "input", "output") if not settings.get(key)]
    if missing:
        raise ConfigError(f"label needs {', '.join(missing)} (as flags or keys of --config)")
    storage.configure_s3(settings.get("s3_endpoint"), settings.get("s3_region"))
    option_names = {field.name for field in dataclasses.fields(labeling.LabelingOptions)}
    options = labeling.LabelingOptions(
        model_dir=storage.absolute(settings["model"]),
        input_uri=storage.absolute(settings["input"]),
        output_uri=storage.absolute(settings["output"]),
        **{key: value for key, value in settings.items() if key in option_names},
    )
    plan = labeling.prepare(options)
    init_ray(settings.get("address"))
    print(labeling.run(plan).report())
    return 0


def cmd_export(args) -> int:
    from genderrec import manifest
    from genderrec.bundle import ModelBundle

    storage.configure_s3(args.s3_endpoint, args.s3_region)
    bundle = ModelBundle.load(args.model)
    uris = manifest.read_manifest(args.manifest)["image_uri"].head(args.check_images) if args.manifest else ()
    sample = bundle.check_inputs(uris, args.check_images)
    source = f"{len(sample)} images of {args.manifest}" if args.manifest else f"{len(sample)} random inputs"
    for fmt in args.format:
        record = bundle.export(args.model, fmt, sample).card.exports[fmt]
        print(
            f"{args.model}: {fmt} written ({', '.join(record['files'])}); checked against Keras on {source}: "
            f"largest |dp| {record['max_abs_dp']:.2g}"
            + (f" (bf16: {record['max_abs_dp_bf16']:.2g})" if "max_abs_dp_bf16" in record else "")
        )
    return 0


def cmd_serve(args) -> int:
    from ray import serve

    from genderrec import serving

    settings = serving.settings(
        args.config,
        args.set or [],
        host=args.host,
        port=args.port,
        model=args.model,
        faces=args.faces,
        min_face_size=args.min_face_size,
        min_face_confidence=args.min_face_confidence,
        max_faces=args.max_faces,
        engine=args.engine,
        precision=args.precision,
        s3_endpoint=args.s3_endpoint,
        s3_region=args.s3_region,
    )
    stop_on_ctrl_c_or_sigterm()  # while Ray starts
    init_ray(args.address)
    try:
        stop_on_ctrl_c_or_sigterm()  # ray.init set its own SIGTERM handler (sys.exit, which would leave the app deployed)
        url = serving.start(settings)  # what `serve run` does with the config
        print(f"serving at {url} (API docs: {url.rstrip('/')}/docs); Ctrl-C or SIGTERM stops it")
        stop_on_ctrl_c_or_sigterm()
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


def stop_on_ctrl_c_or_sigterm() -> None:
    """Make SIGINT and SIGTERM raise KeyboardInterrupt in the main thread, and unblock both.

    Called again once Ray runs and once Serve runs, so that nothing they set up in between decides it: ``ray.init``
    makes SIGTERM call ``sys.exit``, and processes that Ray starts have SIGINT blocked (ray/_private/services.py) and
    pass that mask on. The caller sleeps in 1-second steps, so a
    signal delivered to one of Ray's threads still interrupts the main thread within a second.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def cmd_evaluate(args) -> int:
    from genderrec import evaluation, reports

    storage.configure_s3(args.s3_endpoint, args.s3_region)
    if args.calibrate:
        raise ValueError(
            "--calibrate is gone: evaluate never writes model files. Fit the temperature with "
            "`genderrec calibrate --model DIR --manifest M` (it writes the card), then evaluate"
        )
    if args.model and not args.manifest:
        raise ValueError("--model needs --manifest (a labeled Parquet manifest with image_uri, male and split)")
    options = evaluation.EvaluationOptions(
        split=args.split,
        group_by=tuple(args.group_by or ()),
        threshold_metric=args.threshold_metric,
        replicates=args.bootstrap,
        seed=args.seed,
        min_group_size=args.min_group_size,
        face_images=not args.no_face_images,
        batch_size=args.batch_size,
        faces=args.faces or "aligned",
        face_options=faces.FaceOptions(
            **{key: getattr(args, key) for key in faces.FaceOptions.model_fields if getattr(args, key) is not None}
        ),
    )
    manifest = storage.absolute(args.manifest) if args.manifest else None
    out = storage.absolute(args.out)
    if args.runs:
        comparison, results = evaluation.evaluate_runs(storage.absolute(args.runs), manifest, options)
        for name, (metrics, rows) in results.items():
            reports.write_model_report(metrics, rows, storage.join(out, "models", name), options.face_images)
        reports.write_comparison_report(comparison, out)
        for model in comparison["models"]:
            accuracy = model["accuracy"]
            versus = model.get("vs_best")
            verdict = "best" if not versus else f"p={versus['p_holm']:.3g} vs best (Holm)"
            print(
                f"{model['name']:<24} accuracy {accuracy['value']:.4f} [{accuracy['low']:.4f}, {accuracy['high']:.4f}] {verdict}"
            )
    else:
        metrics, rows = evaluation.evaluate_model(storage.absolute(args.model), manifest, options)
        reports.write_model_report(metrics, rows, out, options.face_images)
        for name, point in metrics["at_threshold"].items():
            accuracy = point["accuracy"]
            print(
                f"{name} threshold {point['threshold']:.3f}: accuracy {accuracy['value']:.4f} "
                f"[{accuracy['low']:.4f}, {accuracy['high']:.4f}] on {metrics['data']['images']} images"
            )
    print(f"report: {storage.join(out, 'report.html')}")
    return 0


def cmd_calibrate(args) -> int:
    """The one command that writes a temperature into a model card."""
    from genderrec import evaluation, manifest
    from genderrec.bundle import ModelBundle, write_card

    storage.configure_s3(args.s3_endpoint, args.s3_region)
    model_dir, manifest_uri = storage.absolute(args.model), storage.absolute(args.manifest)
    model = ModelBundle.load(model_dir)
    card = evaluation.calibrate(model, manifest.read_manifest(manifest_uri), manifest_uri, args.batch_size)
    write_card(model_dir, card)
    fit = card.calibration
    print(
        f"temperature {card.temperature:.4f} fitted on {fit.fitted_on}: val log-loss {fit.val_log_loss_before:.4f} "
        f"-> {fit.val_log_loss_after:.4f}; written to {storage.join(model_dir, 'card.json')}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genderrec", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare-celeba", help="CelebA folder (local or s3://) → Parquet manifest")
    prepare.add_argument("--celeba-dir", required=True, help="folder holding CelebA's official layout")
    prepare.add_argument("--out", required=True, help="manifest path (local or s3://)")
    prepare.add_argument("--split", choices=["identity", "seed", "official"], default="identity")
    prepare.add_argument("--subset", type=int, help="stratified random subset of N images")
    prepare.add_argument(
        "--fractions", type=float, nargs=3, default=[0.64, 0.16, 0.20], metavar=("TRAIN", "VAL", "TEST")
    )
    prepare.add_argument("--seed", type=int, default=42)
    prepare.add_argument("--skip-missing", action="store_true", help="skip (and list) items with missing files/rows")
    _storage_flags(prepare)
    prepare.set_defaults(func=cmd_prepare_celeba)

    train = commands.add_parser("train-all", help="train and compare every (architecture, mode) on Ray")
    train.add_argument("--config", required=True, help="YAML config (see configs/)")
    train.add_argument("--celeba-dir", help="CelebA folder (overrides data.celeba_dir)")
    train.add_argument("--manifest", help="prepared manifest (overrides data.manifest)")
    train.add_argument("--storage-path", help="where runs go, local or s3:// (overrides run.storage_path)")
    train.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. training.epochs=1"
    )
    train.set_defaults(func=cmd_train_all)

    label = commands.add_parser(
        "label",
        help="label images (Parquet manifest or folder/s3:// prefix) with Ray Data",
        description="Every flag can also be a key of the --config YAML (e.g. configs/label.yaml); flags win.",
    )
    label.add_argument("--config", help="YAML whose keys are these flags' names, e.g. configs/label.yaml")
    label.add_argument("--model", help="model directory (model.keras + card.json), local or s3:// (required)")
    label.add_argument("--input", help="Parquet manifest with image_uri, or a folder / s3:// prefix (required)")
    label.add_argument("--output", help="output folder for Parquet labels, local or s3:// (required)")
    label.add_argument("--batch-size", type=int, help="images per inference batch (default 64)")
    label.add_argument("--actors", type=int, help="inference actors, each loads the model once (default 1)")
    label.add_argument("--gpus-per-actor", type=float, help="GPUs per actor, e.g. 1 or 0.5 (default 0)")
    _engine_flags(label)
    label.add_argument("--threshold", type=float, help="p_male at or above it is labeled male (default: model card)")
    label.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="label only the shards with no output file yet (after a crash)",
    )
    label.add_argument(
        "--retry-errors",
        action="store_true",
        default=None,
        help="with --resume: label the rows that failed to read (retryable errors) again, replacing them",
    )
    label.add_argument(
        "--rows-per-file",
        type=int,
        help="input images per output file (default 10,000); fixed by an output's first run",
    )
    label.add_argument("--max-pixels", type=int, help="larger images get an error row (default 40,000,000)")
    _face_flags(label)
    label.add_argument(
        "--face-actors", type=int, help="face detection actors (CPU), with --faces detect|auto (default 1)"
    )
    label.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a new local Ray)")
    _storage_flags(label)
    label.set_defaults(func=cmd_label)

    serve_ = commands.add_parser("serve", help="serve a model directory over HTTP (API + web page) with Ray Serve")
    serve_.add_argument("--model", help="model directory (model.keras + card.json), local or s3://")
    serve_.add_argument("--config", help="Serve config file, e.g. configs/serve.yaml (default: built-in defaults)")
    serve_.add_argument("--host", help="address to bind (default: the config's, else 127.0.0.1)")
    serve_.add_argument("--port", type=int, help="HTTP port (default: the config's, else 8000)")
    serve_.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a builder arg, e.g. max_batch_size=32 or autoscaling_config.max_replicas=8",
    )
    _face_flags(serve_)  # --faces: the mode of requests without ?faces=
    _engine_flags(serve_)
    serve_.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a new local Ray)")
    _storage_flags(serve_)
    serve_.set_defaults(func=cmd_serve)

    export = commands.add_parser(
        "export", help="write a model directory's model in another format beside model.keras, checked against it"
    )
    export.add_argument("--model", required=True, help="model directory (model.keras + card.json), local or s3://")
    export.add_argument(
        "--format", required=True, action="append", choices=list(engines.EXPORT_FILES), help="repeat for several"
    )
    export.add_argument("--manifest", help="check on this manifest's first images (default: seeded random inputs)")
    export.add_argument("--check-images", type=int, default=16, help="images the export is checked on (default 16)")
    _storage_flags(export)
    export.set_defaults(func=cmd_export)

    evaluate = commands.add_parser(
        "evaluate", help="metrics with intervals, per-group accuracy, calibration and an HTML report"
    )
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model directory (model.keras + card.json), local or s3://")
    source.add_argument("--runs", help="a train_all run directory: evaluate and compare all its models")
    evaluate.add_argument("--manifest", help="labeled Parquet manifest (default with --runs: the run's manifest)")
    evaluate.add_argument("--split", default="test", help="manifest split to evaluate (default test)")
    evaluate.add_argument("--out", required=True, help="report folder, local or s3://")
    evaluate.add_argument(
        "--group-by", action="append", metavar="COLUMN", help="also report per value of this categorical column"
    )
    evaluate.add_argument(
        "--calibrate", action="store_true", help="removed (evaluate never writes model files): use genderrec calibrate"
    )
    evaluate.add_argument(
        "--threshold-metric",
        choices=["balanced_accuracy", "accuracy"],
        default="balanced_accuracy",
        help="what the threshold chosen on the val split maximises (default balanced_accuracy)",
    )
    evaluate.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates (default 2000)")
    evaluate.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    evaluate.add_argument(
        "--min-group-size", type=int, default=30, help="groups with fewer images are flagged small (default 30)"
    )
    evaluate.add_argument(
        "--no-face-images", action="store_true", help="list the mistakes' image ids instead of showing the faces"
    )
    evaluate.add_argument("--batch-size", type=int, default=64, help="images per inference batch (default 64)")
    _face_flags(evaluate)  # detect/auto: each image is scored by its largest face
    _storage_flags(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    calibrate = commands.add_parser(
        "calibrate",
        help="fit temperature scaling on a manifest's val split and write it into the model card",
        description="The only command that changes a model directory after train-all: it writes `temperature` and "
        "`calibration` into card.json (labeling, serving and evaluate apply it). Fitted on the model's raw outputs, "
        "so calibrating again replaces the temperature rather than compounding it.",
    )
    calibrate.add_argument("--model", required=True, help="model directory (model.keras + card.json), local or s3://")
    calibrate.add_argument("--manifest", required=True, help="labeled Parquet manifest with a val split")
    calibrate.add_argument("--batch-size", type=int, default=64, help="images per inference batch (default 64)")
    _storage_flags(calibrate)
    calibrate.set_defaults(func=cmd_calibrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as exc:  # BundleError is a ValueError
        print(f"genderrec {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
