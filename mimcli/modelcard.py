"""The model card (``README.md``) of a pushed encoder: YAML front matter through huggingface_hub's
``ModelCardData`` (so the model-index is in the Hub's own format), then how the encoder was
refined, the before/after table from ``mimcli eval``, the probe plot and a usage snippet."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mimcli
from mimcli.evaluate import EvalResult
from mimcli.report import eval_rows

PIPELINE_TAG = "image-feature-extraction"


@dataclass
class CardInputs:
    repo_id: str
    arch: str
    stock_timm: bool  # loadable by timm alone (False for mimcli_vit_postnorm)
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


def _num(value: Any) -> float | None:
    try:
        return float(str(value).split(" ±")[0])
    except ValueError:
        return None


def results_table(result: EvalResult, base: int | None, refined: int) -> str:
    """Markdown table metric | base | refined | change, from ``mimcli eval`` results."""
    names = ["refined (this repo)"]
    idx = [refined]
    if base is not None:
        names.insert(0, f"base ({result.models[base].name})")
        idx.insert(0, base)
    header = "| metric | " + " | ".join(names) + (" | change |" if base is not None else " |")
    lines = [header, "|---" * (len(names) + 1 + (base is not None)) + "|"]
    for metric, values in eval_rows(result):
        if metric.strip() == "chosen cell":
            continue
        cells = [values[i] for i in idx]
        metric = metric.replace("1% %", "1% of labels %")
        row = f"| {metric} | " + " | ".join(cells)
        if base is not None:
            a, b = _num(cells[0]), _num(cells[1])
            delta = "" if a is None or b is None else f"{b - a:+.2f}"
            row += f" | {delta}"
        lines.append(row + " |")
    return "\n".join(lines)


def _model_index(inputs: CardInputs) -> list[Any]:
    """huggingface_hub ``EvalResult`` entries for the refined model's headline metrics."""
    from huggingface_hub import EvalResult as HubEvalResult

    result = inputs.eval
    if result is None:
        return []
    m = result.models[inputs.eval_columns[1]]
    train = Path(result.train) if result.train else None
    dataset_name = train.parent.name if train is not None and train.parent.name else "imagefolder"
    dataset_type = inputs.datasets[0] if inputs.datasets else dataset_name
    split = Path(result.val).name if result.val else None
    metrics: list[tuple[str, str, float]] = []
    for kind, label in (("cls", "CLS"), ("patch", "mean patch")):
        for k, value in m.knn.get(kind, {}).items():
            metrics.append(("accuracy", f"k-NN top-1 ({label}, k={k})", value))
    if m.linear.get("best", {}).get("val_acc") is not None:
        metrics.append(("accuracy", "linear probe top-1", m.linear["best"]["val_acc"]))
    for key, stats in m.lowshot.items():
        metrics.append(
            ("accuracy", f"{key} logistic regression top-1 (mean of splits)", stats["mean"])
        )
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
    from huggingface_hub import ModelCardData

    objective = inputs.run.get("config", {}).get("objective", "nna")
    tags = ["mimcli", "mim-refiner", objective, "image-feature-extraction", "timm"]
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
    cfg, res = run.get("config", {}), run.get("resolved", {})
    env = run.get("environment", {})
    steps = res.get("steps", {})
    per_epoch = res.get("steps_per_epoch") or 0
    world = res.get("world_size", 1) or 1
    epochs = (steps.get("refine", 0) / per_epoch) if per_epoch else None
    head_epochs = (steps.get("heads", 0) / per_epoch) if per_epoch else None
    blocks = res.get("blocks", [])
    views = res.get("views", {})
    lines = [
        f"- objective: **{cfg.get('objective', 'nna')}** "
        "(Nearest Neighbour Alignment, MIM-Refiner, arXiv 2402.10093)"
        if cfg.get("objective", "nna") == "nna"
        else f"- objective: **{cfg.get('objective')}**",
        f"- ID heads on blocks {', '.join(map(str, blocks)) or '?'} "
        f"({res.get('blocks_reason', '')})",
        f"- {steps.get('heads', '?')} head warm-up steps"
        + (f" ({head_epochs:.2f} epochs)" if head_epochs is not None else "")
        + f", then {steps.get('refine', '?')} refinement steps"
        + (f" ({epochs:.2f} epochs)" if epochs is not None else "")
        + f" of batch {cfg.get('batch_size', '?')} x {world} process(es) on "
        f"{res.get('images', '?')} images",
        f"- lr {res.get('lr', cfg.get('lr'))}, head lr {res.get('head_lr', cfg.get('head_lr'))}, "
        f"layer decay {cfg.get('layer_decay')}, weight decay {cfg.get('weight_decay')}",
        f"- neighbour queue {res.get('queue_size', '?')} entries, top-{cfg.get('topk', '?')}, "
        f"temperature {res.get('temperature', '?')}; {views.get('local_crops', 0)} local crops",
        f"- exported weights: {cfg.get('export', 'ema')} encoder; {res.get('device', '?')}, "
        f"{res.get('precision', '?')}, mimcli {env.get('mimcli', mimcli.__version__)}",
    ]
    return lines


def usage(inputs: CardInputs) -> str:
    setup = (
        "import timm\n"
        if inputs.stock_timm
        else "import timm\nimport mimcli.models  # registers the mimcli_vit_postnorm architecture\n"
    )
    return (
        "```python\n"
        f"{setup}import torch\nfrom PIL import Image\n\n"
        f'model = timm.create_model("hf-hub:{inputs.repo_id}", pretrained=True).eval()\n'
        "data_cfg = timm.data.resolve_data_config({}, model=model)\n"
        "transform = timm.data.create_transform(**data_cfg)\n\n"
        'image = Image.open("photo.jpg").convert("RGB")\n'
        "with torch.no_grad():\n"
        "    tokens = model.forward_features(transform(image).unsqueeze(0))\n"
        "    cls = model.forward_head(tokens, pre_logits=True)  # image embedding\n"
        "    patches = tokens[:, model.num_prefix_tokens :].mean(1)  # mean-patch embedding\n"
        "```\n"
    )


def render_card(inputs: CardInputs) -> str:
    base = inputs.base_hub_id or inputs.base_spec
    name = inputs.repo_id.split("/")[-1]
    parts = [
        "---\n" + front_matter(inputs) + "---\n",
        f"# {name}\n",
        f"A `{inputs.arch}` encoder refined from `{base}` with "
        "mimcli (MIM-Refiner recipe): ID heads on intermediate blocks were trained "
        "so that the frozen encoder gives stronger off-the-shelf features (k-NN, low-shot, "
        "clustering) than the masked-image-modeling model it started from.\n",
    ]
    if not inputs.stock_timm:
        parts.append(
            "> **Needs mimcli to load.** This is a data2vec 2.0 style *post-norm* ViT; no stock "
            "timm architecture computes the same function, so the weights use the "
            "`mimcli_vit_postnorm` architecture that `pip install mimcli` registers with timm on "
            "`import mimcli.models`. Without it, `timm.create_model` fails with an unknown "
            "architecture.\n"
        )
    parts += ["## How it was refined\n", "\n".join(_refine_summary(inputs.run)) + "\n"]
    parts.append(f"License: `{inputs.license}` ({inputs.license_note}).\n")
    if inputs.eval is not None:
        r = inputs.eval
        parts += [
            "## Results\n",
            f"`mimcli eval` on {r.train_images} train / {r.val_images} val images "
            f"({r.num_classes} classes), frozen features of the last block:\n",
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
    parts.append(
        "Files: `model.safetensors` (encoder weights only, loaded strictly by timm), `config.json` "
        "(timm architecture and preprocessing), `mimcli_run.json` (the refine configuration), "
        "`eval_results.json` / `probe.json` when published.\n"
    )
    return "\n".join(parts)
