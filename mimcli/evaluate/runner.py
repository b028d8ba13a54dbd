"""``mimcli eval``: the paper's frozen-feature protocols (METHOD §1.5) for one or more models.

Features of the last four blocks (CLS and mean patch) are extracted once per (model, folder,
transform) and cached; every protocol then works on those features:
- k-NN on the last block's CLS and mean patch (standardise, L2, exp(sim/tau) votes; several k);
- a linear probe grid ({CLS, CLS+mean patch} × {last block, last 4 blocks} × lrs);
- low-shot logistic regression (1, 2, 5 images per class and 1%, 3 seeded splits);
- k-means clustering of the val set's last-block CLS features.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mimcli.data import eval_transform, native_size, resize_note
from mimcli.datasources import labelled_images
from mimcli.errors import MimcliError
from mimcli.evaluate.knn import accuracy_of, last_block_knn_correct
from mimcli.evaluate.linear import LAST_BLOCKS
from mimcli.evaluate.splits import NamedSplit, folder_names, load_split_files, shot_name
from mimcli.evaluate.stats import pack
from mimcli.featcache import cached_features
from mimcli.index import resolve_backend
from mimcli.models.released import PREFIX as RELEASED_PREFIX
from mimcli.models.released import is_released_spec
from mimcli.models.sources import load_model
from mimcli.models.spec import HEADS_SUFFIX, parse_model_spec
from mimcli.results import REFINED_SUFFIX, EvalResult, ModelEval, save_eval_json
from mimcli.runs import RunFolder
from mimcli.runtime import Progress, configure_threads, select_device, torch_threads
from mimcli.trackers import check_trackers

PROTOCOLS = ("knn", "linear", "lowshot", "cluster")


@dataclass
class EvalConfig:
    models: list[str]
    train: str | Path  # a folder or a source (mimcli.datasources)
    val: str | Path
    out: Path | None = None
    num_heads: int | None = None  # for every MODEL without a count in its file or #heads=N
    protocols: tuple[str, ...] = PROTOCOLS
    ks: tuple[int, ...] = (10, 20)
    tau: float = 0.07
    shots: tuple[float, ...] = (1, 2, 5, 0.01)
    seeds: tuple[int, ...] = (0, 1, 2)
    cluster_features: str = "cls"
    linear_epochs: int = 20
    batch_size: int = 128
    num_workers: int | str = "auto"
    device: str = "auto"
    knn_backend: str = "auto"
    limit_train: int | None = None
    limit_val: int | None = None
    cache: bool = True
    seed: int = 0
    threads: int | None = None
    image_column: str | None = None
    label_column: str | None = None
    split_files: tuple[str | Path, ...] = ()  # --split-file: low-shot subsets of a folder --train
    trackers: list[str] = field(default_factory=list)  # --tracker: mimcli.trackers
    save_heads: Path | None = None  # --save-heads: each model's best linear-probe head


def resolve_eval_source(spec: str) -> tuple[str, str]:
    """A refine run folder evaluates its exported encoder; anything else is a MODEL argument
    (a ``#heads=N`` suffix stays on what is loaded, not on a run folder's label)."""
    parsed = parse_model_spec(spec)
    run = RunFolder.at(Path(parsed.source))
    if run is not None:
        export = str(run.export_dir)
        if parsed.num_heads is not None:
            export += f"{HEADS_SUFFIX}{parsed.num_heads}"
        return export, f"{parsed.source}{REFINED_SUFFIX}"
    return spec, spec


def _display_names(specs: Sequence[str]) -> list[str]:
    """Column names: a path's last part; ``mim-refiner:NAME`` as given (it says whose model it
    is); the whole MODEL arguments when those parts repeat."""
    names = [s if is_released_spec(s) else Path(s.rstrip("/")).name or s for s in specs]
    return names if len(set(names)) == len(names) else list(specs)


def _stage_labels(names: Sequence[str]) -> list[str]:
    """Progress labels: at most 16 characters (``mim-refiner:`` dropped) and never two alike,
    since the progress display keeps one bar per label."""
    short = [n.removeprefix(RELEASED_PREFIX) for n in names]
    short = [n if len(n) <= 16 else f"{n[:7]}…{n[-8:]}" for n in short]
    if len(set(short)) < len(short):
        short = [f"{i}:{n}" for i, n in enumerate(short, 1)]
    return short


def evaluate_model(
    spec: str,
    name: str,
    cfg: EvalConfig,
    train_images,
    val_images,
    progress: Progress | None,
    device,
    backend: str,
    label: str | None = None,
    split_files: Sequence[NamedSplit] = (),
) -> ModelEval:
    source, label = resolve_eval_source(spec)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    loaded = load_model(source, num_heads=cfg.num_heads)
    if getattr(loaded.model, "cls_token", None) is None:
        raise MimcliError(f"{spec}: the model has no class token; eval reads the CLS token")
    depth = loaded.num_blocks
    blocks = list(range(max(1, depth - LAST_BLOCKS + 1), depth + 1))
    model = loaded.model.to(device)
    transform = eval_transform(loaded.pretrained_cfg)
    tcfg = {
        k: loaded.pretrained_cfg.get(k)
        for k in ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation")
    }
    input_size = int((tcfg.get("input_size") or (3, 224, 224))[-1])
    for what, images in (("--train", train_images), ("--val", val_images)):
        note = resize_note(images, input_size, what)
        if note:
            logging.getLogger(__name__).info(note)
    feats = {}
    cached = True
    for split, images in (("train", train_images), ("val", val_images)):
        feats[split], hit = cached_features(
            model,
            images,
            transform,
            tcfg,
            blocks,
            device,
            use_cache=cfg.cache,
            progress=progress,
            stage=f"{label or name[:12]}:{split}",
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
        )
        cached &= hit
    timings["features"] = time.perf_counter() - start
    result = ModelEval(name=name, source=label, arch=loaded.arch, features_cached=cached)
    native = native_size(train_images)
    result.preprocessing = {
        **{k: list(v) if isinstance(v, tuple) else v for k, v in tcfg.items()},
        "native_size": list(native) if native else None,  # the first train image, w x h
    }
    train, val = feats["train"], feats["val"]
    num_classes = len(train_images.classes)
    last = blocks[-1]
    try:
        if "knn" in cfg.protocols:
            t = time.perf_counter()
            correct = last_block_knn_correct(
                train, val, cfg.ks, cfg.tau, num_classes, backend, device
            )
            result.knn = {
                kind: {str(k): accuracy_of(c) for k, c in per_k.items()}
                for kind, per_k in correct.items()
            }
            result.knn_correct = {
                kind: {str(k): pack(c) for k, c in per_k.items()} for kind, per_k in correct.items()
            }
            timings["knn"] = time.perf_counter() - t
        if "linear" in cfg.protocols:
            from mimcli.evaluate.linear import LinearConfig, linear_probe

            t = time.perf_counter()
            with torch_threads(1):
                result.linear = linear_probe(
                    train.cls,
                    train.patch,
                    train.labels,
                    val.cls,
                    val.patch,
                    val.labels,
                    num_classes,
                    LinearConfig(epochs=cfg.linear_epochs, seed=cfg.seed, device=str(device)),
                    keep_best=cfg.save_heads is not None,
                )
            if cfg.save_heads is not None:
                _save_head(cfg.save_heads, result, loaded, blocks, train_images.classes)
            timings["linear"] = time.perf_counter() - t
        if "lowshot" in cfg.protocols:
            from mimcli.evaluate.lowshot import lowshot_eval

            t = time.perf_counter()
            split_dir = cfg.out / "splits" if cfg.out else None
            names = folder_names(train_images) if split_dir else None
            result.lowshot = lowshot_eval(
                train.block(last, "cls"),
                train.labels,
                val.block(last, "cls"),
                val.labels,
                shots=cfg.shots,
                seeds=cfg.seeds,
                split_dir=split_dir,
                split_files=split_files,
                train_names=names,
            )
            timings["lowshot"] = time.perf_counter() - t
        if "cluster" in cfg.protocols:
            from mimcli.evaluate.cluster import cluster_eval

            t = time.perf_counter()
            result.cluster = cluster_eval(
                val.block(last, cfg.cluster_features), val.labels, num_classes, seed=cfg.seed
            )
            timings["cluster"] = time.perf_counter() - t
    finally:
        train.close()
        val.close()
    result.seconds = timings
    return result


def _save_head(root: Path, result: ModelEval, loaded, blocks: list[int], classes) -> None:
    """``--save-heads``: the best linear-probe cell of ``result`` with its feature recipe, class
    names and eval transform, in ``root/<model name>/`` (``result.linear`` loses the tensors)."""
    from timm.data import resolve_data_config

    from mimcli.linear_head import TRANSFORM_KEYS, feature_recipe, head_folder_name, save_head

    head = result.linear.pop("head")
    best = result.linear["best"]
    resolved = resolve_data_config(dict(loaded.pretrained_cfg))
    transform = {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in resolved.items()
        if k in TRANSFORM_KEYS and v is not None
    }
    recipe = {
        "model": result.source,
        "name": result.name,
        "arch": result.arch,
        **feature_recipe(best["features"], blocks),
        "eps": head["eps"],
        "classes": list(classes),
        "transform": transform,
        "lr": best["lr"],
        "holdout_acc": best["holdout_acc"],
        "val_acc": best["val_acc"],
    }
    save_head(root / head_folder_name(result.name), head["tensors"], recipe)


def run_eval(cfg: EvalConfig, progress: Progress | None = None) -> EvalResult:
    """Evaluate every model of ``cfg.models`` on the same train/val images."""
    unknown = [p for p in cfg.protocols if p not in PROTOCOLS]
    if unknown or not cfg.protocols:
        raise MimcliError(f"--protocols: unknown {unknown}; choose from {', '.join(PROTOCOLS)}")
    if not cfg.models:
        raise MimcliError("give at least one MODEL")
    if any(k < 1 for k in cfg.ks):
        raise MimcliError("--k values must be at least 1")
    if cfg.cluster_features not in ("cls", "patch"):
        raise MimcliError("--cluster-features must be cls or patch")
    if cfg.split_files and "lowshot" not in cfg.protocols:
        raise MimcliError("--split-file is a low-shot subset: add lowshot to --protocols")
    if cfg.save_heads is not None and "linear" not in cfg.protocols:
        raise MimcliError("--save-heads keeps linear-probe heads: add linear to --protocols")
    check_trackers(cfg.trackers)
    configure_threads(cfg.threads)
    device = select_device(cfg.device)
    backend = resolve_backend(cfg.knn_backend, device)
    train_images, val_images = labelled_images(cfg)
    splits = load_split_files(cfg.split_files, train_images, [shot_name(s) for s in cfg.shots])
    names = _display_names(cfg.models)
    labels = _stage_labels(names)
    if cfg.save_heads is not None:
        from mimcli.linear_head import head_folder_name

        folders = [head_folder_name(n) for n in names]
        if len(set(folders)) < len(folders):
            raise MimcliError(
                f"--save-heads: models {names} would share a head folder; evaluate them apart"
            )
    models = [
        evaluate_model(
            spec,
            name,
            cfg,
            train_images,
            val_images,
            progress,
            device,
            backend,
            label,
            split_files=splits,
        )
        for spec, name, label in zip(cfg.models, names, labels, strict=True)
    ]
    result = EvalResult(
        models=models,
        train_images=len(train_images),
        val_images=len(val_images),
        num_classes=len(train_images.classes),
        protocols=list(cfg.protocols),
        ks=list(cfg.ks),
        train=str(cfg.train),
        val=str(cfg.val),
    )
    if cfg.out is not None:
        save_eval(result, cfg.out)
    if cfg.trackers:
        track_eval(result, cfg)
    return result


def save_eval(result: EvalResult, out: Path) -> None:
    """``results.json`` and the plots in ``out``."""
    from mimcli.report.plots import plot_knn, plot_lowshot

    save_eval_json(result, out)
    if "knn" in result.protocols:
        plot_knn(result, out / "knn.png")
    if "lowshot" in result.protocols:
        plot_lowshot(result, out / "lowshot.png")


def track_eval(result: EvalResult, cfg: EvalConfig) -> None:
    """``--tracker``: the final metrics and the plots as one new run of each tracker, the
    options as its config (without ``--out`` the plots are drawn in a temporary folder)."""
    import tempfile

    from mimcli.report.plots import plot_knn, plot_lowshot
    from mimcli.trackers import eval_scalars, open_trackers

    name = None if cfg.out else "eval"  # the tracker runs' name: --out's folder name
    trackers = open_trackers(cfg.trackers, cfg.out, asdict(cfg), run_name=name)
    failed = True
    try:
        trackers.log(0, eval_scalars(result))
        with tempfile.TemporaryDirectory() as tmp:
            folder = cfg.out or Path(tmp)
            images = {}
            for protocol, plot in (("knn", plot_knn), ("lowshot", plot_lowshot)):
                if protocol in result.protocols:
                    path = folder / f"{protocol}.png"
                    images[protocol] = path if cfg.out else plot(result, path)
            trackers.log_images(0, images)
        failed = False
    finally:
        trackers.finish(failed)
