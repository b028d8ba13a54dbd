"""The model card (``README.md``) of a pushed encoder: YAML front matter through huggingface_hub's
``ModelCardData`` (so the model-index is in the Hub's own format), then how the encoder was
refined, the before/after table from ``mimcli eval``, the probe plot and a usage snippet."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mimcli._version import __version__
from mimcli.evaluate.stats import SIGNIFICANT, p_text
from mimcli.objectives import OBJECTIVES, ObjectiveInfo
from mimcli.report.rows import eval_rows, headline
from mimcli.results import EvalResult

PIPELINE_TAG = "image-feature-extraction"


@dataclass
class CardInputs:
    """Everything the card says, gathered when the repo folder is built (secrets removed)."""

    repo_id: str
    arch: str
    stock_timm: bool  # loadable by timm alone (False for postnorm.MIMCLI_ARCHS)
    run: dict[str, Any]  # the run's config.json (config / resolved / environment)
    base_spec: str  # the MODEL argument refine started from
    base_hub_id: str | None  # a Hub repo id for the ``base_model`` field, when there is one
    license: str
    license_note: str  # where the license came from
    datasets: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    eval: EvalResult | None = None
    eval_columns: tuple[int | None, int] = (None, 0)  # (base index or None, refined index)
    probe_plot: str | None = None  # path inside the repo
    probe_model: str = ""  # the model the probe plot is of
    plots: list[str] = field(default_factory=list)  # other plots, paths inside the repo
    num_params: int = 0
    # frozen teachers of mimco/mrmae runs: (source, license or None)
    teachers: list[tuple[str, str | None]] = field(default_factory=list)
    head: dict[str, Any] | None = None  # head.json of a published linear-probe head


def results_table(result: EvalResult, base: int | None, refined: int) -> str:
    """Markdown table metric | base | refined | change (from unrounded values), the rows of
    :func:`mimcli.report.rows.eval_rows` that either model has; ``base`` None drops its column."""
    idx = [refined] if base is None else [base, refined]
    names = [f"base ({result.models[base].name})"] if base is not None else []
    names.append("refined (this repo)")
    header = "| metric | " + " | ".join(names) + (" | change |" if base is not None else " |")
    lines = [header, "|---" * (len(names) + 1 + (base is not None)) + "|"]
    for metric in eval_rows(result):
        values = [metric.cell(result.models[i]) for i in idx]
        if all(v is None for v in values):
            continue
        precision = metric.digits
        cells = []
        for v, i in zip(values, idx, strict=True):
            spread = (
                None
                if v is None
                else v[1]
                if v[1] is not None
                else metric.error(result.models[i], result.val_images)
            )
            cells.append(
                "-"
                if v is None
                else f"{v[0]:.{precision}f}" + (f" ± {spread:.2f}" if spread is not None else "")
            )
        row = f"| {metric.label} | " + " | ".join(cells)
        if base is not None:
            a, b = values
            change = "" if a is None or b is None else f"{b[0] - a[0]:+.{precision}f}"
            p = metric.paired_p(result.models[base], result.models[refined])
            row += " | " + (change if p is None or not change else f"{change} ({p_text(p)})")
        lines.append(row + " |")
    return "\n".join(lines)


def _model_index(inputs: CardInputs) -> list[Any]:
    """huggingface_hub ``EvalResult`` entries for the refined model's headline metrics."""
    from huggingface_hub import EvalResult as HubEvalResult

    result = inputs.eval
    if result is None:
        return []
    m = result.models[inputs.eval_columns[1]]
    # a Hub dataset id only from --dataset or an hfds/ source, never from a folder's name
    dataset_type = inputs.datasets[0] if inputs.datasets else "imagefolder"
    dataset_name = inputs.datasets[0] if inputs.datasets else "local image folder"
    split = f"{Path(result.val).name if result.val else 'val'} ({result.val_images} images)"
    metrics: list[tuple[str, str, float]] = []
    for kind, label in (("cls", "CLS"), ("patch", "mean patch")):
        for k, value in m.knn.get(kind, {}).items():
            metrics.append(("accuracy", f"k-NN top-1 ({label}, k={k})", value))
    if m.linear.get("best", {}).get("val_acc") is not None:
        metrics.append(("accuracy", "linear probe top-1", m.linear["best"]["val_acc"]))
    for key, stats in m.lowshot.items():
        over = "split file" if "split_file" in stats else "mean of splits"
        metrics.append(("accuracy", f"{key} logistic regression top-1 ({over})", stats["mean"]))
    if "nmi" in m.cluster:
        metrics.append(("nmi", "k-means NMI", m.cluster["nmi"]))
    if "acc" in m.cluster:
        metrics.append(("accuracy", "k-means cluster accuracy", m.cluster["acc"]))
    return [
        HubEvalResult(
            task_type="image-classification",
            task_name="frozen-feature classification",
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=metric_type,
            metric_name=name,
            metric_value=round(float(value), 4),
        )
        for metric_type, name, value in metrics
    ]


def front_matter(inputs: CardInputs) -> str:
    """The card's YAML (without the ``---`` fences): library, pipeline, license, base model,
    datasets, tags (mimcli, the objective's family and name, then ``inputs.tags``), model-index."""
    from huggingface_hub import ModelCardData

    objective, info = _objective(inputs.run)
    family = info.tag if info else objective
    tags = ["mimcli", family, objective, "image-feature-extraction", "timm"]
    tags = list(dict.fromkeys(tags))
    data = ModelCardData(
        library_name="timm",
        pipeline_tag=PIPELINE_TAG,
        license=inputs.license,
        base_model=inputs.base_hub_id,
        datasets=inputs.datasets or None,
        tags=[*tags, *inputs.tags],
        model_name=inputs.repo_id,
        eval_results=_model_index(inputs) or None,
    )
    return data.to_yaml().rstrip("\n") + "\n"


def _refine_summary(run: dict[str, Any]) -> list[str]:
    """Markdown bullets on how the run refined its encoder (objective, heads or settings, steps,
    optimiser, queue, exported weights)."""
    cfg, res = run.get("config", {}), run.get("resolved", {})
    env = run.get("environment", {})
    steps = res.get("steps", {})
    per_epoch = res.get("steps_per_epoch") or 0
    world = res.get("world_size", 1) or 1
    epochs = (steps.get("refine", 0) / per_epoch) if per_epoch else None
    head_epochs = (steps.get("heads", 0) / per_epoch) if per_epoch else None
    blocks = res.get("blocks", [])
    views = res.get("views", {})
    objective, info = _objective(run)
    lines = [
        f"- objective: **{objective}** ({info.title if info else 'see mimcli'})",
        (
            f"- ID heads on blocks {', '.join(map(str, blocks)) or '?'} "
            f"({res.get('blocks_reason', '')})"
            if "queue_size" in res
            else f"- objective settings: {_objective_settings(res)}"
        ),
        f"- {steps.get('heads', '?')} head warm-up steps"
        + (f" ({head_epochs:.2f} epochs)" if head_epochs is not None else "")
        + f", then {steps.get('refine', '?')} refinement steps"
        + (f" ({epochs:.2f} epochs)" if epochs is not None else "")
        + f" of batch {cfg.get('batch_size', '?')} x {world} process(es) on "
        f"{res.get('images', '?')} images"
        + (f" of `{_short(cfg['data'])}`" if cfg.get("data") else ""),
        f"- lr {res.get('lr', cfg.get('lr'))}, head lr {res.get('head_lr', cfg.get('head_lr'))}, "
        f"layer decay {cfg.get('layer_decay')}, weight decay {cfg.get('weight_decay')}",
    ]
    if "queue_size" in res:
        lines.append(
            f"- neighbour queue {res.get('queue_size', '?')} entries, top-{cfg.get('topk', '?')}, "
            f"temperature {res.get('temperature', '?')}; {views.get('local_crops', 0)} local crops"
        )
    lines.append(
        f"- exported weights: {cfg.get('export', 'ema')} encoder; {res.get('device', '?')}, "
        f"{res.get('precision', '?')}, mimcli {env.get('mimcli', __version__)}"
    )
    return lines


def _objective(run: dict[str, Any]) -> tuple[Any, ObjectiveInfo | None]:
    """The run's objective name and its registry entry (None for a name mimcli does not know,
    e.g. from another version: the card then falls back to the bare name)."""
    name = run.get("config", {}).get("objective", "nna")
    return name, OBJECTIVES.get(name)


def _objective_sentence(inputs: CardInputs) -> str:
    """What refinement did, in the words of the objective's registry entry."""
    objective, info = _objective(inputs.run)
    return info.sentence if info else f"objective {objective}"


# resolved config keys that are bookkeeping, not objective settings
_LOOP_KEYS = {
    "blocks", "blocks_reason", "freeze_blocks", "steps", "steps_per_epoch", "lr", "head_lr",
    "views", "images", "device", "world_size", "precision", "arch", "model_args", "format",
    "objective",
}  # fmt: skip


def _setting(value: Any) -> str:
    """A teacher or decoder by its source; other dicts as ``(key value, ...)``."""
    if not isinstance(value, dict):
        return str(value)
    if "source" in value:
        return str(value["source"])
    return "(" + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in value.items()) + ")"


def _objective_settings(res: dict[str, Any]) -> str:
    parts = []
    for key, value in res.items():
        if key in _LOOP_KEYS:
            continue
        if value is None:
            continue
        if isinstance(value, list | tuple):
            value = ", ".join(_setting(v) for v in value)
        else:
            value = _setting(value)
        parts.append(f"{key.replace('_', ' ')} {value}")
    return "; ".join(parts) or "defaults"


def _short(path: Any) -> str:
    """The last two parts of a local path (``fmnist/train``): enough to say what it was."""
    return "/".join(Path(str(path)).parts[-2:])


def _data_name(result: EvalResult) -> str:
    """``, `<dataset folder>``` when the eval names its train folder, else nothing."""
    return f", `{Path(result.train).parent.name}`" if result.train else ""


def usage(inputs: CardInputs) -> str:
    """The card's Python snippet: load through timm, CLS and mean-patch embeddings."""
    setup = (
        "import timm\n"
        if inputs.stock_timm
        else "import timm\nimport mimcli.models.postnorm  # registers the architecture\n"
    )
    # a repo id without an owner: a dry-run folder (no Hub repo yet): load it from disk
    where = f"hf-hub:{inputs.repo_id}" if "/" in inputs.repo_id else "local-dir:PATH/TO/THIS/FOLDER"
    return (
        "```python\n"
        f"{setup}import torch\nfrom PIL import Image\n\n"
        f'model = timm.create_model("{where}", pretrained=True).eval()\n'
        "data_cfg = timm.data.resolve_data_config({}, model=model)\n"
        "transform = timm.data.create_transform(**data_cfg)\n\n"
        'image = Image.open("photo.jpg").convert("RGB")\n'
        "with torch.no_grad():\n"
        "    # what the results above measured: the last block before the final norm\n"
        "    [(patches, prefix)] = model.forward_intermediates(\n"
        "        transform(image).unsqueeze(0), indices=1, norm=False,\n"
        "        return_prefix_tokens=True, output_fmt='NLC', intermediates_only=True)\n"
        "    cls = prefix[:, 0]  # image embedding (CLS)\n"
        "    mean_patch = patches.mean(1)  # mean-patch embedding\n"
        "```\n\n"
        "`model.forward_features(x)` gives the same tokens after the final norm "
        "(`model.forward_head(tokens, pre_logits=True)` pools them), as timm's classifiers "
        "use them.\n"
    )


def head_usage(inputs: CardInputs) -> str:
    """The card's second snippet: classify an image with the encoder and the linear-probe head
    (timm, torch, safetensors and json only), or nothing when no head is published."""
    recipe = inputs.head
    if recipe is None:
        return ""
    setup = "" if inputs.stock_timm else "import mimcli.models.postnorm  # registers the arch\n"
    if "/" in inputs.repo_id:
        where = f"hf-hub:{inputs.repo_id}"
        hub_import = "from huggingface_hub import hf_hub_download\n"
        fetch = f'def repo_file(name):\n    return hf_hub_download("{inputs.repo_id}", name)\n'
    else:
        where, hub_import = "local-dir:PATH/TO/THIS/FOLDER", ""
        fetch = 'def repo_file(name):\n    return "PATH/TO/THIS/FOLDER/" + name\n'
    blocks = ("block " if len(recipe["blocks"]) == 1 else "blocks ") + ", ".join(
        map(str, recipe["blocks"])
    )
    tokens = "CLS and mean patch token" if recipe["tokens"] == "cls+patch" else "CLS token"
    return (
        "### Classify with the linear-probe head\n\n"
        f"`head.safetensors` is the best cell of the eval's linear probe ({recipe['features']}: "
        f"the {tokens} of {blocks} before the final norm, "
        f"{len(recipe['classes'])} classes, val accuracy {recipe['val_acc']:.2f}%); `head.json` "
        "holds its feature recipe, class names and eval transform.\n\n"
        "```python\n"
        f"import json\n\nimport timm\n{setup}import torch\n{hub_import}from PIL import Image\n"
        "from safetensors.torch import load_file\n\n\n"
        f"{fetch}\n\n"
        f'model = timm.create_model("{where}", pretrained=True).eval()\n'
        'head = load_file(repo_file("head.safetensors"))  # weight, bias, mean, var\n'
        'with open(repo_file("head.json")) as f:\n'
        "    recipe = json.load(f)\n"
        'transform = timm.data.create_transform(**recipe["transform"])\n\n'
        'image = Image.open("photo.jpg").convert("RGB")\n'
        "with torch.no_grad():\n"
        "    taps = model.forward_intermediates(\n"
        '        transform(image).unsqueeze(0), indices=recipe["indices"], norm=False,\n'
        "        return_prefix_tokens=True, output_fmt='NLC', intermediates_only=True)\n"
        "    # block after block: the CLS token, then (cls+patch) the mean patch token\n"
        "    parts = []\n"
        "    for patches, prefix in taps:\n"
        "        parts.append(prefix[:, 0])\n"
        '        if recipe["tokens"] == "cls+patch":\n'
        "            parts.append(patches.mean(1))\n"
        "    x = torch.cat(parts, dim=1)\n"
        '    x = (x - head["mean"]) / torch.sqrt(head["var"] + recipe["eps"])\n'
        '    logits = x @ head["weight"].T + head["bias"]\n'
        'print(recipe["classes"][logits.argmax(1).item()])\n'
        "```\n"
    )


def _shape(inputs: CardInputs) -> str:
    """Width, depth, patch, image size, parameters and architecture, as one phrase."""
    args = inputs.run.get("resolved", {}).get("model_args") or {}
    parts = []
    if "embed_dim" in args:
        parts.append(f"width {args['embed_dim']}")
    if "depth" in args:
        parts.append(f"{args['depth']} blocks")
    if "patch_size" in args:
        parts.append(f"patch {args['patch_size']}")
    size = args.get("img_size")
    if size:
        parts.append(f"{size[0] if isinstance(size, list | tuple) else size} px")
    if inputs.num_params:
        parts.append(f"{inputs.num_params / 1e6:.1f} M parameters")
    parts.append(f"timm architecture `{inputs.arch}`")
    return ", ".join(parts)


def _claim(inputs: CardInputs) -> str:
    """The card's first sentence ends with what was measured, not with what was hoped."""
    base, refined = inputs.eval_columns
    change = None if inputs.eval is None or base is None else headline(inputs.eval, base, refined)
    if change is None:
        return (
            "to give stronger off-the-shelf features (k-NN, low-shot, clustering) than the "
            "masked-image-modeling model it started from; this repo holds no comparison with "
            "that model."
        )
    diff, p = change
    tested = "" if p is None else f", McNemar {p_text(p)}"
    if diff > 0 and (p is None or p < SIGNIFICANT):
        return (
            "so that the frozen encoder gives stronger off-the-shelf features than the "
            f"masked-image-modeling model it started from (k-NN {diff:+.2f} points{tested}, "
            "below)."
        )
    return (
        "to strengthen its off-the-shelf features; on the evaluation below it did **not** "
        f"measurably improve k-NN accuracy over the model it started from ({diff:+.2f} "
        f"points{tested})."
    )


def render_card(inputs: CardInputs) -> str:
    """The whole ``README.md``: front matter, summary, how it was refined, license, teachers,
    results, plots, usage and the list of files."""
    base = inputs.base_hub_id or inputs.base_spec
    name = inputs.repo_id.split("/")[-1]
    parts = [
        "---\n" + front_matter(inputs) + "---\n",
        f"# {name}\n",
        f"A ViT encoder ({_shape(inputs)}) refined from `{base}` with "
        f"mimcli ({_objective_sentence(inputs)}) {_claim(inputs)}\n",
    ]
    if not inputs.stock_timm:
        what = (
            "a data2vec 2.0 style *post-norm* ViT"
            if inputs.arch == "mimcli_vit_postnorm"
            else "a BEiT with *no final norm* (data2vec-vision saved without its pooler)"
        )
        parts.append(
            f"> **Needs mimcli to load.** This is {what}; no stock timm architecture computes "
            f"the same function, so the weights use the `{inputs.arch}` architecture that "
            "`pip install mimcli` registers with timm on `import mimcli.models.postnorm`. "
            "Without it, `timm.create_model` fails with an unknown architecture.\n"
        )
    parts += ["## How it was refined\n", "\n".join(_refine_summary(inputs.run)) + "\n"]
    parts.append(f"License: `{inputs.license}` ({inputs.license_note}).\n")
    if inputs.teachers:
        listed = "; ".join(
            f"`{source}` (license: {lic or 'unknown'})" for source, lic in inputs.teachers
        )
        parts.append(
            f"Trained to match frozen teacher(s): {listed}. A model distilled from a teacher may "
            "be bound by the teacher's terms as well; check them before use.\n"
        )
    if inputs.eval is not None:
        r = inputs.eval
        parts += [
            "## Results\n",
            f"`mimcli eval` with frozen features on {r.train_images} train / {r.val_images} "
            f"val images ({r.num_classes} classes{_data_name(r)}): k-NN, low-shot and k-means "
            "use the last block's CLS token (or mean patch token) before the final norm; the "
            "linear probe reports the best cell of its grid (CLS or CLS + mean patch, last or "
            "last 4 blocks). Changes are computed before rounding.\n",
            results_table(r, *inputs.eval_columns) + "\n",
        ]
    else:
        parts.append(
            "## Results\n\nNo `mimcli eval` results were published with this model: run "
            "`mimcli eval BASE RUN_DIR --train ... --val ... --out RUN_DIR/eval` before pushing.\n"
        )
    if inputs.probe_plot:
        parts.append(
            f"k-NN accuracy after every block of `{inputs.probe_model}` (`mimcli probe`):\n\n"
            f"![k-NN accuracy per block]({inputs.probe_plot})\n"
        )
    captions = {"knn": "k-NN accuracy against k", "lowshot": "low-shot accuracy"}
    parts += [f"![{captions.get(Path(p).stem, Path(p).stem)}]({p})\n" for p in inputs.plots]
    parts += ["## Usage\n", usage(inputs)]
    if inputs.head is not None:
        parts.append(head_usage(inputs))
    parts.append(
        "Files: `model.safetensors` (encoder weights only, loaded strictly by timm), `config.json` "
        "(timm architecture and preprocessing), `mimcli_run.json` (the refine configuration), "
        "`eval_results.json` / `probe.json` / `head.safetensors` + `head.json` when published.\n"
    )
    return "\n".join(parts)
