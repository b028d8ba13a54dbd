"""Where a refine run's encoder came from, as its Hub repo states it: the base model's Hub id and
license (inherited, given, or unknown), the teachers it was trained against, and which columns
of ``mimcli eval`` results are the base model and this run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mimcli.errors import MimcliError
from mimcli.models.released import LICENSE_NOTE as RELEASE_LICENSE_NOTE
from mimcli.models.released import is_released_spec
from mimcli.models.spec import model_source
from mimcli.results import EvalResult, ModelEval
from mimcli.runs import RunFolder


def teacher_sources(run: dict[str, Any]) -> list[str]:
    """``--teacher`` sources a run used (mimco records one ``teacher``, mrmae ``teachers``)."""
    resolved = run.get("resolved", {})
    found = resolved.get("teachers") or ([resolved["teacher"]] if resolved.get("teacher") else [])
    return [str(t.get("source", "")) if isinstance(t, dict) else str(t) for t in found if t]


def base_model_info(spec: str, pretrained_cfg: dict[str, Any]) -> tuple[str | None, str | None]:
    """(Hub repo id, license) of the model a run started from, where they can be known offline
    (timm's pretrained configs, a local folder's model card) or from the Hub's cached card.
    A MODEL's ``#heads=N`` suffix is not part of where it came from."""
    spec = model_source(spec)
    hub_id: str | None = None
    license_: str | None = pretrained_cfg.get("license")
    if spec.startswith("hf-hub:"):
        hub_id = spec[len("hf-hub:") :].split("@")[0]
    elif not Path(spec).exists() and "://" not in spec:
        try:
            import timm

            cfg = timm.models.get_pretrained_cfg(spec)
        except Exception:  # unknown names have no config; nothing to inherit
            cfg = None
        if cfg is not None:
            hub_id = cfg.hf_hub_id or None
            license_ = license_ or cfg.license
    card: Path | None = Path(spec) / "README.md" if Path(spec).is_dir() else None
    if hub_id and license_ is None:
        from mimcli.hub.download import hub_file

        try:
            card = hub_file(hub_id, "README.md", spec)
        except MimcliError:
            card = None
    if card is not None and card.is_file():
        meta = _front_matter(card.read_text(errors="replace"))
        license_ = license_ or meta.get("license")
    return hub_id, (str(license_) if license_ else None)


def _front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a model card (empty when there is none or it does not parse)."""
    if not text.startswith("---"):
        return {}
    import yaml

    try:
        meta = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return {}
    return meta if isinstance(meta, dict) else {}


def choose_license(
    given: str | None, inherited: str | None, base_name: str, base_spec: str
) -> tuple[str, str, str | None]:
    """The repo's license, where it came from, and a warning when it is unknown.

    Args:
        given: ``--license``, which wins.
        inherited: the base model's license (:func:`base_model_info`).
        base_name: how the card names the base model (its Hub id, else ``base_spec``).
        base_spec: the MODEL argument the run started from.

    Returns:
        (license, note for the card, warning or None); an unknown license is ``other`` (for a
        ``mim-refiner:NAME`` base, the note says the release states none and names its page).
    """
    if given:
        return given, "set with --license", None
    if inherited:
        return inherited, f"inherited from the base model {base_name}", None
    if is_released_spec(base_spec):
        return (
            "other",
            f"the base model {base_spec.strip()} was released with {RELEASE_LICENSE_NOTE}",
            f"the license of {base_spec.strip()} is unknown ({RELEASE_LICENSE_NOTE}): the card "
            "says `other`; pass --license",
        )
    return (
        "other",
        "the base model's license is unknown; set it with --license",
        f"the license of {base_spec} is unknown: the card says `other`; pass --license",
    )


def eval_columns(
    result: EvalResult, run_dir: Path, base_spec: str, warnings: list[str] | None = None
) -> tuple[int | None, int]:
    """(base, refined) model indices in eval results. The refined one is this run (its path or
    its export's, else its folder name); the base one is the MODEL the run started from. When
    the run has moved since the eval, the last model that is not the base is taken, with a
    warning (``mimcli eval BASE RUN_DIR`` lists the run last)."""

    def same(model: ModelEval, target: Path) -> bool:
        path = model.refined_run or model.source
        try:
            return Path(path).resolve() == target.resolve()
        except OSError:
            return False

    def is_base(m: ModelEval) -> bool:
        return m.source == base_spec or same(m, Path(base_spec))

    models = result.models
    export = RunFolder(run_dir).export_dir
    refined = [i for i, m in enumerate(models) if same(m, run_dir) or same(m, export)] or [
        i for i, m in enumerate(models) if m.name == run_dir.name
    ]
    if not refined:
        candidates = [i for i, m in enumerate(models) if not is_base(m)]
        if not candidates:
            raise MimcliError(
                f"--eval: every evaluated model is the base model; evaluate the run with "
                f"`mimcli eval BASE {run_dir} --train ... --val ... --out {run_dir}/eval`"
            )
        refined = [candidates[-1]]
        if warnings is not None:
            warnings.append(
                f"eval results name no model at {run_dir}; taking {models[refined[0]].name!r} "
                "(the last one that is not the base model) as this run"
            )
    r = refined[0]
    base = [i for i, m in enumerate(models) if i != r and is_base(m)]
    others = [i for i in range(len(models)) if i != r]
    if base:
        return base[0], r
    return (others[0] if len(others) == 1 else None), r
