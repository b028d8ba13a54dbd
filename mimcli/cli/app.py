"""The ``mimcli`` command: one sub-command per module in this package."""

from __future__ import annotations

from typing import Annotated

import typer

import mimcli
from mimcli.cli import eval as eval_cli
from mimcli.cli import probe as probe_cli
from mimcli.cli import push as push_cli
from mimcli.cli import refine as refine_cli

app = typer.Typer(
    name="mimcli",
    help=(
        "Refine masked-image-modeling ViTs (MAE, data2vec 2.0) into encoders with strong "
        "off-the-shelf features (MIM-Refiner).\n\n"
        "Start with `mimcli probe MODEL --train DIR --val DIR` to see feature quality per block."
    ),
    epilog="Example:\n\n  mimcli probe vit_large_patch16_224.mae --train in1k/train --val in1k/val",
    no_args_is_help=True,
    add_completion=True,  # --install-completion, --show-completion; start-up stays torch-free
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mimcli {mimcli.__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = None,
) -> None:
    """mimcli: probe, refine, evaluate and publish MIM encoders."""


app.command("probe", help=probe_cli.HELP, epilog=probe_cli.EPILOG)(probe_cli.probe)
app.command("refine", help=refine_cli.HELP, epilog=refine_cli.EPILOG)(refine_cli.refine)
app.command("eval", help=eval_cli.HELP, epilog=eval_cli.EPILOG)(eval_cli.evaluate)
app.command("push", help=push_cli.HELP, epilog=push_cli.EPILOG)(push_cli.push)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
