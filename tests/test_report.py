"""The eval metric rows shared by the terminal table and the model card: same labels, same order,
each table formatting values its own way."""

from __future__ import annotations

from mimcli.report.modelcard import results_table
from mimcli.report.rows import eval_rows
from mimcli.report.tables import eval_table
from mimcli.results import EvalResult

LABELS = [
    "k-NN CLS k=1 %",
    "k-NN CLS k=5 %",
    "k-NN mean patch k=1 %",
    "k-NN mean patch k=5 %",
    "linear probe % (best grid cell)",
    "1-shot %",
    "1% of labels %",
    "k-means ACC %",
    "k-means NMI",
    "k-means AMI",
    "k-means ARI",
    "silhouette",
    "Davies-Bouldin (lower is better)",
]


def two_models() -> EvalResult:
    """A base with every protocol and a refined model without clustering results (and a
    low-shot entry without its spread)."""

    def model(name: str, shift: float, cluster: bool) -> dict:
        return {
            "name": name,
            "source": name,
            "arch": "vit",
            "features_cached": False,
            "knn": {kind: {"1": 50.0 + shift, "5": 60.0 + shift} for kind in ("cls", "patch")},
            "linear": {"best": {"val_acc": 70.0 + shift, "features": "cls@last", "lr": 0.1}},
            "lowshot": {
                "1-shot": {"mean": 30.0 + shift, "std": 1.5},
                "1%": {"mean": 40.0, "std": 2.0} if cluster else {"mean": 42.0},
            },
            "cluster": {
                "acc": 55.5,
                "nmi": 0.123456,
                "ami": 0.2,
                "ari": 0.3,
                "silhouette": 0.4,
                "davies_bouldin": 1.25,
            }
            if cluster
            else {},
        }

    return EvalResult.from_dict(
        {
            "models": [model("base", 0.0, True), model("run", 2.5, False)],
            "train_images": 10,
            "val_images": 4,
            "num_classes": 2,
            "protocols": ["knn", "linear", "lowshot", "cluster"],
            "ks": [1, 5],
        }
    )


def test_table_and_card_name_the_metrics_alike():
    result = two_models()
    assert [row.label for row in eval_rows(result)] == LABELS

    table = eval_table(result)
    metrics = list(table.columns[0]._cells)
    assert [m for m in metrics if m != "  chosen cell"] == LABELS
    assert metrics[metrics.index("linear probe % (best grid cell)") + 1] == "  chosen cell"

    card = results_table(result, 0, 1)
    lines = card.splitlines()
    assert lines[0] == "| metric | base (base) | refined (this repo) | change |"
    assert [line.split(" | ")[0].removeprefix("| ") for line in lines[2:]] == LABELS


def test_each_table_formats_its_cells():
    result = two_models()
    table = eval_table(result)
    metrics = list(table.columns[0]._cells)
    base, run = list(table.columns[1]._cells), list(table.columns[2]._cells)
    nmi = metrics.index("k-means NMI")
    assert (base[nmi], run[nmi]) == ("0.12", "-")  # 2 decimals; the refined model has none
    assert run[metrics.index("1-shot %")] == "32.50 ± 1.50"
    assert run[metrics.index("  chosen cell")] == "cls@last lr 0.1"
    # a low-shot entry without a spread: the card and the table both show no value
    assert (base[metrics.index("1% of labels %")], run[metrics.index("1% of labels %")]) == (
        "40.00 ± 2.00",
        "-",
    )

    rows = results_table(result, 0, 1).splitlines()
    card = {line.split(" | ")[0].removeprefix("| "): line for line in rows[2:]}
    assert card["k-means NMI"] == "| k-means NMI | 0.1235 | - |  |"  # 4 decimals, no change
    assert card["k-NN CLS k=5 %"] == "| k-NN CLS k=5 % | 60.00 | 62.50 | +2.50 |"
    assert card["1-shot %"] == "| 1-shot % | 30.00 ± 1.50 | 32.50 ± 1.50 | +2.50 |"
    assert card["1% of labels %"] == "| 1% of labels % | 40.00 ± 2.00 | - |  |"
    only_refined = results_table(result, None, 1).splitlines()
    assert only_refined[0] == "| metric | refined (this repo) |"
    assert not any(line.startswith("| k-means") for line in only_refined)


def test_eval_table_shows_standard_errors_and_the_change():
    """Single-query accuracies carry their binomial SE (k-NN from the kept queries, the linear
    probe over the val images); the change column has McNemar's p for k-NN."""
    import numpy as np
    from rich.console import Console

    from mimcli.evaluate.stats import pack
    from mimcli.report.tables import eval_table
    from mimcli.results import EvalResult, ModelEval

    right = np.arange(100) < 80
    models = [
        ModelEval(name=n, source=n, arch="vit", features_cached=False,
                  knn={"cls": {"20": acc}, "patch": {"20": acc}},
                  knn_correct={"cls": {"20": pack(c)}, "patch": {"20": pack(c)}},
                  linear={"best": {"val_acc": lin, "features": "cls@last", "lr": 0.1,
                                   "correct": pack(np.arange(100) < lin)}},
                  lowshot={"5-shot": {"mean": shot, "std": 1.0, "runs": [shot, shot],
                                      "correct": [pack(np.arange(100) < shot)] * 2}})
        for n, acc, c, lin, shot in (("a", 80.0, right, 70.0, 50.0),
                                     ("b", 90.0, np.arange(100) < 90, 75.0, 50.0))
    ]  # fmt: skip
    result = EvalResult(models=models, protocols=("knn", "linear", "lowshot"), ks=(20,),
                        train_images=500,
                        val_images=100, num_classes=10, train="t", val="v")  # fmt: skip
    console = Console(width=200, record=True)
    console.print(eval_table(result))
    text = console.export_text()
    assert "80.00 ± 4.00" in text and "90.00 ± 3.00" in text  # sqrt(.8*.2/100), sqrt(.9*.1/100)
    assert "70.00 ± 4.58" in text  # the linear probe over 100 val images
    assert "+10.00 (p=0.002)" in text  # 10 discordant pairs, all one way: 2 / 2**10
    assert "+5.00 (p=0.062)" in text  # linear: 5 discordant pairs, 2 / 2**5
    assert "50.00 ± 1.00" in text and "+0.00 (p=1.000)" in text  # low-shot: its spread, no change
