"""The folder ``mimcli push`` uploads, built offline from a finished refine run: the encoder in
timm's layout, the model card, the run's configuration with secrets removed, eval/probe results
and their plots. It is assembled under a temporary name beside the destination and renamed into
place, so a failed build leaves an earlier folder as it was.

Data2vec 2.0 encoders use mimcli's ``mimcli_vit_postnorm`` (post-norm blocks), and data2vec-vision
models saved without a pooler ``mimcli_beit_no_final_norm``; no stock timm architecture computes
those functions, so such repos keep the architecture name, the card says that
``import mimcli.models.postnorm`` must run before ``timm.create_model``, and the build warns.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mimcli._version import __version__
from mimcli.errors import MimcliError
from mimcli.evaluate.stats import SIGNIFICANT, p_text
from mimcli.fileio import write_json, write_text
from mimcli.hub.provenance import base_model_info, choose_license, eval_columns, teacher_sources
from mimcli.hub.scrub import scrub, scrub_literals
from mimcli.hub.timm_layout import CONFIG_FILE, WEIGHTS_FILE, encoder_weights, write_timm_folder
from mimcli.linear_head import HEAD_RECIPE, HEAD_WEIGHTS, head_folder_name, read_head
from mimcli.models.postnorm import MIMCLI_ARCHS, POSTNORM_ARCH
from mimcli.report import modelcard
from mimcli.report.rows import headline
from mimcli.results import EVAL_FILE, PROBE_FILE, EvalResult, load_eval, read_probe_json
from mimcli.runs import CONFIG, EXPORT, RunFolder

MARKER = "mimcli_run.json"  # present in every folder ``build_repo_folder`` wrote
# where ``mimcli eval`` / ``mimcli probe`` results are picked up from when not given
PLOTS = "plots"


@dataclass
class RepoFolder:
    """A folder :func:`build_repo_folder` wrote.

    Attributes:
        path: the folder.
        files: its files, relative to ``path``, sorted.
        arch: the timm architecture of the encoder.
        stock_timm: whether timm alone loads it (False for ``postnorm.MIMCLI_ARCHS``).
        license: the license the card states.
        warnings: what the user should know (unknown license, post-norm, guessed eval column).
    """

    path: Path
    files: list[str]
    arch: str
    stock_timm: bool
    license: str
    warnings: list[str] = field(default_factory=list)


def read_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's ``config.json`` and its export's timm ``config.json``."""
    run = RunFolder(run_dir)
    if not run.config_path.is_file() or not (run.export_dir / WEIGHTS_FILE).is_file():
        raise MimcliError(
            f"{run_dir}: not a finished mimcli refine run (needs {CONFIG} and "
            f"{EXPORT}/{WEIGHTS_FILE}); run `mimcli refine MODEL --out RUN_DIR` to the end first"
        )
    try:
        config = json.loads(run.config_path.read_text())
        timm_cfg = json.loads((run.export_dir / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MimcliError(f"{run_dir}: unreadable run or export config.json ({exc})") from exc
    if "architecture" not in timm_cfg or "model_args" not in timm_cfg:
        raise MimcliError(f"{run.export_dir / CONFIG_FILE}: not a timm config (no architecture)")
    return config, timm_cfg


def _eval_option(path: Path) -> tuple[EvalResult, Path]:
    """``--eval``: a ``results.json`` (or a folder holding it) and the folder of its plots."""
    file = path / EVAL_FILE if path.is_dir() else path
    try:
        return load_eval(file), file.parent
    except MimcliError as err:
        raise MimcliError(
            f"--eval {path}: not a results.json written by mimcli eval ({err.__cause__})"
        ) from err.__cause__


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def not_better(inputs: modelcard.CardInputs) -> list[str]:
    """A warning when the refined model is not measurably better than its base on the
    headline k-NN metric (the card says so too)."""
    base, refined = inputs.eval_columns
    if inputs.eval is None or base is None:
        return []
    change = headline(inputs.eval, base, refined)
    if change is None:
        return []
    diff, p = change
    if diff > 0 and (p is None or p < SIGNIFICANT):
        return []
    tested = "" if p is None else f", McNemar {p_text(p)}"
    return [
        f"the refined model is not measurably better than its base on k-NN ({diff:+.2f} "
        f"points{tested}); the card says so"
    ]


def hub_datasets(run: dict[str, Any], eval_path: Path | None) -> list[str]:
    """Hub dataset ids the run and its eval read (``hfds/``/``hfids/`` sources); a local
    folder's name is never taken for one."""
    specs = [run.get("config", {}).get("data")]
    if eval_path is not None:
        try:
            result = _eval_option(eval_path)[0]
            specs += [result.train, result.val]
        except MimcliError:
            pass
    ids: list[str] = []
    for spec in specs:
        text = str(spec or "")
        if text.startswith(("hfds/", "hfids/")):
            name = text.split("/", 1)[1].rsplit(":", 1)[0]
            if name not in ids:
                ids.append(name)
    return ids


def build_repo_folder(
    run_dir: Path,
    dest: Path,
    repo_id: str,
    *,
    eval_path: Path | None = None,
    probe_path: Path | None = None,
    license: str | None = None,  # noqa: A002 - the Hub's field name
    datasets: Iterable[str] = (),
    tags: Iterable[str] = (),
    heads_path: Path | None = None,
) -> RepoFolder:
    """Write the repo of ``run_dir`` to ``dest`` (assembled beside it, then renamed).

    Args:
        run_dir: a finished ``mimcli refine`` run folder.
        dest: the folder to write; it must not exist, be empty, or be one this function wrote.
        repo_id: ``OWNER/NAME``, for the card's title and usage snippet.
        eval_path: ``results.json`` (or its folder); default ``RUN_DIR/eval/results.json``.
        probe_path: ``probe.json`` (or its folder); default ``RUN_DIR/probe/probe.json``.
        license: overrides the license inherited from the base model.
        datasets: Hub dataset ids for the card.
        tags: extra card tags.
        heads_path: a head folder (``head.json`` + ``head.safetensors``) or an
            ``eval --save-heads`` folder holding the refined model's; default
            ``<eval folder>/heads/<refined model>/`` when present.

    Returns:
        The folder written, with its files and the warnings to show.
    """
    run_dir, dest = Path(run_dir), Path(dest)
    run, timm_cfg = read_run(run_dir)
    arch, model_args = timm_cfg["architecture"], dict(timm_cfg["model_args"])
    if dest.exists() and not (
        dest.is_dir() and (not any(dest.iterdir()) or (dest / MARKER).exists())
    ):
        raise MimcliError(
            f"--to {dest}: exists and is not a folder written by mimcli push; choose a new folder"
        )
    if eval_path is None:
        eval_path = _existing(RunFolder(run_dir).eval_dir / EVAL_FILE)
    if probe_path is None:
        probe_path = _existing(RunFolder(run_dir).probe_dir / PROBE_FILE)
    recorded = run.get("config", {}).get("probe")
    if probe_path is None and recorded:  # the probe.json the run's --probe named
        probe_path = _existing(Path(recorded))
    datasets = [*datasets, *(d for d in hub_datasets(run, eval_path) if d not in datasets)]
    evaluation = _eval_option(eval_path) if eval_path is not None else None
    probe_file = None
    if probe_path is not None:
        probe_file = probe_path / PROBE_FILE if probe_path.is_dir() else probe_path
        read_probe_json(probe_file)  # validates
    tensors = encoder_weights(RunFolder(run_dir).export_dir, arch, model_args)
    base_spec = str(run.get("config", {}).get("model", ""))
    column_warnings: list[str] = []
    columns = (
        eval_columns(evaluation[0], run_dir, base_spec, column_warnings)
        if evaluation
        else (None, 0)
    )
    head = find_head(heads_path, evaluation, columns[1], model_args)

    hub_id, inherited = base_model_info(base_spec, timm_cfg.get("pretrained_cfg", {}))
    warnings: list[str] = []
    lic, note, unknown = choose_license(license, inherited, hub_id or base_spec, base_spec)
    if unknown:
        warnings.append(unknown)
    stock = arch not in MIMCLI_ARCHS
    if not stock:
        kind = "data2vec 2.0 post-norm" if arch == POSTNORM_ARCH else "BEiT with no final norm"
        warnings.append(
            f"{arch} ({kind}) is not a stock timm architecture: loading the repo "
            "needs `pip install mimcli` and `import mimcli.models.postnorm` before "
            "timm.create_model (the model card says so)"
        )

    from huggingface_hub import get_token

    secrets = [get_token() or ""]
    run = scrub(run, secrets)
    tmp = dest.with_name(f".{dest.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / PLOTS).mkdir(parents=True)
    try:
        metadata = {
            "format": "pt",
            "mimcli_version": __version__,
            "base_model": scrub(hub_id or base_spec, secrets),
            "architecture": arch,
            "objective": str(run.get("config", {}).get("objective", "nna")),
        }
        write_timm_folder(tmp, tensors, metadata, timm_cfg)
        write_json(tmp / MARKER, run)
        plots, probe_plot, probe_model = _copy_results(tmp, evaluation, probe_file, secrets)
        if head is not None:
            shutil.copyfile(head[0] / HEAD_WEIGHTS, tmp / HEAD_WEIGHTS)
            head = (head[0], scrub({**head[1], "model": repo_id}, secrets))
            write_json(tmp / HEAD_RECIPE, head[1])
        teachers = [
            (scrub(source, secrets), base_model_info(source, {})[1])
            for source in teacher_sources(run)
        ]
        inputs = modelcard.CardInputs(
            teachers=teachers,
            repo_id=repo_id,
            arch=arch,
            stock_timm=stock,
            run=run,
            base_spec=scrub(base_spec, secrets),
            base_hub_id=hub_id,
            license=lic,
            license_note=note,
            datasets=list(datasets),
            tags=list(tags),
            eval=evaluation[0] if evaluation else None,
            eval_columns=columns,
            head=head[1] if head else None,
            probe_plot=probe_plot,
            probe_model=probe_model,
            num_params=sum(t.numel() for t in tensors.values()),
            plots=plots,
        )
        warnings.extend(column_warnings)
        warnings.extend(not_better(inputs))
        # the card is built from scrubbed inputs; a second pass only removes literal secrets
        # (key patterns would mangle code such as ``return_prefix_tokens=True``)
        write_text(tmp / "README.md", scrub_literals(modelcard.render_card(inputs), secrets))
        if not any((tmp / PLOTS).iterdir()):
            (tmp / PLOTS).rmdir()
        _swap_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    return RepoFolder(dest, files, arch, stock, lic, warnings)


def find_head(
    heads_path: Path | None,
    evaluation: tuple[EvalResult, Path] | None,
    refined: int,
    model_args: dict[str, Any],
) -> tuple[Path, dict[str, Any]] | None:
    """The refined model's linear-probe head to publish: (its folder, its head.json), checked
    against the encoder's width and depth; None when there is none to publish."""
    name = head_folder_name(evaluation[0].models[refined].name) if evaluation else None
    if heads_path is None:
        if evaluation is None or not (evaluation[1] / "heads" / str(name) / HEAD_RECIPE).is_file():
            return None
        folder = evaluation[1] / "heads" / str(name)
    elif (heads_path / HEAD_RECIPE).is_file() or name is None:
        folder = heads_path
    else:
        folder = heads_path / name
    if heads_path is not None and not (folder / HEAD_RECIPE).is_file():
        raise MimcliError(
            f"--heads {heads_path}: no {HEAD_RECIPE} there"
            + (f" or in its {name}/ folder (the refined model's eval column)" if name else "")
        )
    tensors, recipe = read_head(folder)
    per_block = 2 if recipe["tokens"] == "cls+patch" else 1
    width = tensors["weight"].shape[1] // (per_block * len(recipe["indices"]))
    depth, dim = model_args.get("depth"), model_args.get("embed_dim")
    if (dim is not None and width != dim) or (depth is not None and max(recipe["blocks"]) > depth):
        raise MimcliError(
            f"{folder}: the head reads width-{width} features of blocks {recipe['blocks']}, "
            f"but this encoder has width {dim} and {depth} blocks; it belongs to another model"
        )
    return folder, recipe


def _copy_results(
    folder: Path,
    evaluation: tuple[EvalResult, Path] | None,
    probe_file: Path | None,
    secrets: list[str],
) -> tuple[list[str], str | None, str]:
    """Eval and probe results (scrubbed) and their plots into ``folder``.

    Returns:
        (eval plots as repo paths, the probe plot's repo path or None, the probed model's name).
    """
    plots: list[str] = []
    probe_plot, probe_model = None, ""
    if evaluation is not None:
        result, source = evaluation
        write_json(folder / "eval_results.json", scrub(result.to_dict(), secrets))
        for name in ("knn.png", "lowshot.png"):
            if (source / name).is_file():
                shutil.copyfile(source / name, folder / PLOTS / name)
                plots.append(f"{PLOTS}/{name}")
    if probe_file is not None:
        probe_data = scrub(read_probe_json(probe_file), secrets)
        probe_model = str(probe_data.get("model", ""))
        if Path(probe_model).exists():  # a local path says nothing to readers of the card
            probe_model = "/".join(Path(probe_model).resolve().parts[-2:])
        write_json(folder / PROBE_FILE, probe_data)
        if (probe_file.parent / "probe.png").is_file():
            shutil.copyfile(probe_file.parent / "probe.png", folder / PLOTS / "probe.png")
            probe_plot = f"{PLOTS}/probe.png"
    return plots, probe_plot, probe_model


def _swap_into_place(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` onto ``dest``; an earlier ``dest`` is moved aside first, then removed."""
    old = dest.with_name(f".{dest.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    if old.exists():
        shutil.rmtree(old)
