"""Every command's ``--help`` reads well in an 80-column terminal.

The help is rendered the way a user sees it: ``python -m mimcli.cli.app ... --help`` in a
subprocess with ``COLUMNS=80`` (rich) and ``TERMINAL_WIDTH=80`` (typer.rich_utils reads it at
import). At that width no line may be wider than 80 cells, rich must not cut anything off with
"…", every option name must show in full on its row, and every ``[default: …]`` must show whole
on one line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from rich.cells import cell_len

from mimcli.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 80
GROUP = typer.main.get_command(app)
COMMANDS = ["", *GROUP.commands]  # "" is `mimcli --help` itself

PANELS = {  # each command's options, grouped
    "probe": ["Data", "Model", "Output", "k-NN", "Runtime", "Head recommendation", "Transform"],
    "refine": [
        "Data",
        "Output",
        "Model",
        "Objective",
        "Heads and queue",
        "Schedule",
        "Views",
        "Augmentation",
        "MR-MAE (--objective mrmae)",
        "k-NN monitoring",
        "Runtime",
        "Plan (--plan: no training)",
    ],
    "eval": ["Data", "Model", "Output", "Protocols", "Runtime"],
    "push": ["Hub repo", "Output", "Model card", "Retries"],
}

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    """All the help screens, rendered in parallel subprocesses (about half a second)."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "PY_COLORS")}
    env.update(
        COLUMNS=str(WIDTH),
        TERMINAL_WIDTH=str(WIDTH),
        _TYPER_FORCE_DISABLE_TERMINAL="1",
        NO_COLOR="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "mimcli.cli.app", *([name] if name else []), "--help"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
        for name in COMMANDS
    }
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"mimcli {name} --help failed:\n{stderr}"
        out[name] = ANSI.sub("", stdout)
    return out


def command(name: str):  # noqa: ANN201
    return GROUP.commands[name] if name else GROUP


def shown_default(param) -> str | None:  # noqa: ANN001
    """What typer prints inside ``[default: …]`` for a parameter, or None when it prints none."""
    if isinstance(param.show_default, str):
        return f"({param.show_default})"
    if not param.show_default or param.default is None:
        return None
    if getattr(param, "is_flag", False):  # a bool flag: its name, and only for an on/off pair
        if not param.secondary_opts:
            return None
        on = param.default
        return (param.opts if on else param.secondary_opts)[0].lstrip("-")
    if isinstance(param.default, (list, tuple)):
        return ", ".join(map(str, param.default)) if param.default else None
    return str(param.default)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_fits_80_columns(helps, name):
    text = helps[name]
    lines = text.splitlines()
    widths = [cell_len(line) for line in lines]
    too_wide = [line for line, w in zip(lines, widths, strict=True) if w > WIDTH]
    assert not too_wide, f"lines wider than {WIDTH}:\n" + "\n".join(too_wide)
    assert max(widths) == WIDTH, "panels span the terminal: the help was not rendered at 80"
    cut = [line for line in lines if "…" in line]
    assert not cut, "cut off with '…':\n" + "\n".join(cut)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_every_option_name_in_full(helps, name):
    text = helps[name]
    cmd = command(name)
    ctx = typer.Context(cmd, info_name=name or "mimcli")
    params = [p for p in cmd.get_params(ctx) if not getattr(p, "hidden", False)]
    assert params
    missing = []
    for param in params:
        if param.param_type_name == "argument":
            names = [param.display_name_raw]
        else:
            names = [*param.opts, *param.secondary_opts]
        # The row starts with the first name; the others follow on the same line.
        first = re.escape(names[0])
        rows = [
            line
            for line in text.splitlines()
            if re.match(rf"│ [* ]? {{0,4}}{first}(\.\.\.)?(?![\w-])", line)
        ]
        if len(rows) != 1:
            missing.append(f"{names[0]}: {len(rows)} rows")
            continue
        for opt in names[1:]:
            if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", rows[0]):
                missing.append(f"{opt} (row: {rows[0]!r})")
    assert not missing, "option names not shown in full: " + ", ".join(missing)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_every_default_whole(helps, name):
    text = helps[name]
    cmd = command(name)
    broken = [
        line
        for line in text.splitlines()
        if line.count("[default:") != len(re.findall(r"\[default: [^\]]*\]", line))
    ]
    assert not broken, "[default: …] wrapped or cut:\n" + "\n".join(broken)
    ctx = typer.Context(cmd, info_name=name or "mimcli")
    missing = []
    for param in cmd.get_params(ctx):
        default = shown_default(param)
        if default is not None and f"[default: {default}]" not in text:
            missing.append(f"{param.opts[0]} [default: {default}]")
    assert not missing, "defaults not shown whole: " + ", ".join(missing)


@pytest.mark.parametrize("name", sorted(PANELS))
def test_help_groups_options_in_panels(helps, name):
    titles = re.findall(r"^╭─ (.+?) ─+╮$", helps[name], flags=re.M)
    assert titles == ["Arguments", "Options", *PANELS[name]]


@pytest.mark.parametrize("name", COMMANDS)
def test_help_examples_are_not_wrapped(helps, name):
    """Each example command line of the epilog shows on one line, as written."""
    epilog = command(name).epilog or ""
    shown = helps[name].splitlines()
    examples, continued = [], False
    for line in epilog.splitlines():
        if "mimcli " in line:
            examples.append(line[line.index("mimcli ") :].rstrip())
        elif continued:
            examples.append(line.strip())
        continued = line.rstrip().endswith("\\")
    assert examples or not epilog
    wrapped = [ex for ex in examples if not any(ex in row for row in shown)]
    assert not wrapped, "examples wrapped at 80 columns:\n" + "\n".join(wrapped)
