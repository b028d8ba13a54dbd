"""``mimcli push``: a refine run as a timm-loadable Hugging Face repo.

Two steps, so nothing remote happens until the folder is complete:

1. ``build_repo_folder`` writes the repo offline: ``model.safetensors`` (exactly the timm
   architecture's weights, metadata: format, mimcli version, base model), ``config.json`` in timm's
   hub layout, ``README.md`` (model card), ``mimcli_run.json`` (the run's configuration, secrets
   removed), ``eval_results.json`` / ``probe.json`` and their plots under ``plots/`` when given.
   It is assembled beside the destination and renamed into place.
2. ``upload_folder`` creates the repo if needed and uploads the folder as one commit through
   ``huggingface_hub.HfApi``, retrying transient failures (HTTP 408/429/5xx, connection errors)
   with exponential backoff. Unchanged files are skipped by the client, so pushing the same folder
   again creates no new commit: a re-run after a failure is safe.

Data2vec 2.0 encoders use mimcli's ``mimcli_vit_postnorm`` (post-norm blocks); no stock timm
architecture computes that function, so such repos keep the architecture name, the card says that
``import mimcli.models.postnorm`` must run before ``timm.create_model``, and ``push`` warns.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import mimcli
from mimcli.errors import MimcliError, RemoteError
from mimcli.fileio import write_bytes, write_json, write_text
from mimcli.hub.download import is_network_error
from mimcli.models.postnorm import POSTNORM_ARCH
from mimcli.results import EvalResult

MARKER = "mimcli_run.json"  # present in every folder ``build_repo_folder`` wrote
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
_SECRET_KEY = re.compile(
    r"token|secret|passw|^pass$|api[_-]?key|_key$|^key$|auth|credential|signature", re.I
)
_TOKEN_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{8,}")
_SECRET_WORDS = r"(?:token|secret|passw\w*|pass|key|auth\w*|credential\w*|signature)"
_SECRET_FLAG = re.compile(rf"(--[\w-]*{_SECRET_WORDS}[\w-]*[ =])\S+", re.I)
_SECRET_ASSIGN = re.compile(rf"(\b[\w-]*{_SECRET_WORDS}[\w-]*=)[^\s&;,]+", re.I)
_URL_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/\s@]+@", re.I)
_URL_QUERY = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s?#]+)\?[^\s#]*", re.I)
REDACTED = "<redacted>"


@dataclass
class RepoFolder:
    path: Path
    files: list[str]
    arch: str
    stock_timm: bool
    license: str
    warnings: list[str] = field(default_factory=list)


@dataclass
class PushResult:
    repo_id: str
    repo_url: str
    commit_url: str
    commit_oid: str
    pr_url: str | None
    unchanged: bool
    attempts: int


# -- reading the run ------------------------------------------------------------------------


def read_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's config.json and its export's timm config.json."""
    export = run_dir / "export"
    if not (run_dir / "config.json").is_file() or not (export / "model.safetensors").is_file():
        raise MimcliError(
            f"{run_dir}: not a finished mimcli refine run (needs config.json and "
            "export/model.safetensors); run `mimcli refine MODEL --out RUN_DIR` to the end first"
        )
    try:
        run = json.loads((run_dir / "config.json").read_text())
        timm_cfg = json.loads((export / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MimcliError(f"{run_dir}: unreadable run or export config.json ({exc})") from exc
    if "architecture" not in timm_cfg or "model_args" not in timm_cfg:
        raise MimcliError(f"{export / 'config.json'}: not a timm config (no architecture)")
    return run, timm_cfg


def encoder_weights(export: Path, arch: str, model_args: dict[str, Any]) -> dict[str, Any]:
    """The export's tensors, checked to be exactly the architecture's state dict."""
    from safetensors.torch import load_file

    from mimcli.models.build import build_model

    tensors = load_file(str(export / "model.safetensors"))
    expected = build_model(arch, model_args).state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or extra or wrong:
        raise MimcliError(
            f"{export}: weights do not match {arch}: missing {missing[:3]}, unexpected "
            f"{extra[:3]}, wrong shape {wrong[:3]}; re-export the run with `mimcli refine --resume`"
        )
    return {k: tensors[k].contiguous() for k in expected}


_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


def safetensors_bytes(tensors: dict[str, Any], metadata: dict[str, str]) -> bytes:
    """A safetensors file with a byte-for-byte reproducible header (keys sorted), so pushing the
    same weights twice uploads nothing new. (The safetensors writer orders metadata by a hash map
    seeded per process.)"""
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        dtype = _DTYPES.get(str(t.dtype).removeprefix("torch."))
        if dtype is None:
            raise MimcliError(f"cannot publish tensor {name} of dtype {t.dtype}")
        header[name] = {
            "dtype": dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def teacher_sources(run: dict[str, Any]) -> list[str]:
    """``--teacher`` sources a run used (mimco records one ``teacher``, mrmae ``teachers``)."""
    resolved = run.get("resolved", {})
    found = resolved.get("teachers") or ([resolved["teacher"]] if resolved.get("teacher") else [])
    return [str(t.get("source", "")) if isinstance(t, dict) else str(t) for t in found if t]


def base_model_info(spec: str, pretrained_cfg: dict[str, Any]) -> tuple[str | None, str | None]:
    """(Hub repo id, license) of the model a run started from, where they can be known offline
    (timm's pretrained configs, a local folder's model card) or from the Hub's cached card."""
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
    if not text.startswith("---"):
        return {}
    import yaml

    try:
        meta = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return {}
    return meta if isinstance(meta, dict) else {}


def scrub(obj: Any, secrets: Iterable[str] = ()) -> Any:
    """A copy of ``obj`` without secrets: values under token/password-like keys, Hub tokens
    (``hf_...``) and any of ``secrets`` appearing in strings are replaced by ``<redacted>``."""
    secrets = [s for s in secrets if s]
    if isinstance(obj, dict):
        return {
            k: REDACTED
            if _SECRET_KEY.search(str(k)) and v is not None and not isinstance(v, dict | list)
            else scrub(v, secrets)
            for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [scrub(v, secrets) for v in obj]
    if isinstance(obj, str):
        for secret in secrets:
            obj = obj.replace(secret, REDACTED)
        obj = _SECRET_FLAG.sub(r"\1" + REDACTED, obj)
        obj = _SECRET_ASSIGN.sub(r"\1" + REDACTED, obj)
        obj = _URL_USERINFO.sub(r"\1" + REDACTED + "@", obj)
        obj = _URL_QUERY.sub(r"\1?" + REDACTED, obj)
        return _TOKEN_VALUE.sub(REDACTED, obj)
    return obj


def scrub_literals(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with each of ``secrets`` and any Hub token (``hf_...``) replaced by
    ``<redacted>``; nothing else is touched."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return _TOKEN_VALUE.sub(REDACTED, text)


def load_eval(path: Path) -> tuple[EvalResult, Path]:
    """``results.json`` (or a folder holding it) from ``mimcli eval``."""
    file = path / "results.json" if path.is_dir() else path
    try:
        return EvalResult.from_dict(json.loads(file.read_text())), file.parent
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise MimcliError(
            f"--eval {path}: not a results.json written by mimcli eval ({exc})"
        ) from exc


def eval_columns(
    result: EvalResult, run_dir: Path, base_spec: str, warnings: list[str] | None = None
) -> tuple[int | None, int]:
    """(base, refined) model indices in eval results. The refined one is this run (its path or
    its export's, else its folder name); the base one is the MODEL the run started from. When
    the run has moved since the eval, the last model that is not the base is taken, with a
    warning (``mimcli eval BASE RUN_DIR`` lists the run last)."""

    def same(source: str, target: Path) -> bool:
        path = source.split(" (refined")[0]
        try:
            return Path(path).resolve() == target.resolve()
        except OSError:
            return False

    def is_base(m: Any) -> bool:
        return m.source == base_spec or same(m.source, Path(base_spec))

    models = result.models
    refined = [
        i
        for i, m in enumerate(models)
        if same(m.source, run_dir) or same(m.source, run_dir / "export")
    ] or [i for i, m in enumerate(models) if m.name == run_dir.name]
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


# -- building the folder ----------------------------------------------------------------------


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
) -> RepoFolder:
    """Write the repo for ``run_dir`` to ``dest`` (assembled beside it, then renamed)."""
    from mimcli.report.modelcard import CardInputs, render_card
    from mimcli.results import read_probe_json as load_probe

    run_dir, dest = Path(run_dir), Path(dest)
    run, timm_cfg = read_run(run_dir)
    arch, model_args = timm_cfg["architecture"], dict(timm_cfg["model_args"])
    if dest.exists() and not (
        dest.is_dir() and (not any(dest.iterdir()) or (dest / MARKER).exists())
    ):
        raise MimcliError(
            f"--to {dest}: exists and is not a folder written by mimcli push; choose a new folder"
        )
    eval_path = eval_path if eval_path is not None else _default(run_dir / "eval" / "results.json")
    probe_path = (
        probe_path if probe_path is not None else _default(run_dir / "probe" / "probe.json")
    )
    evaluation = load_eval(eval_path) if eval_path is not None else None
    probe_file = None
    if probe_path is not None:
        probe_file = probe_path / "probe.json" if probe_path.is_dir() else probe_path
        load_probe(probe_file)  # validates
    tensors = encoder_weights(run_dir / "export", arch, model_args)

    base_spec = str(run.get("config", {}).get("model", ""))
    hub_id, inherited = base_model_info(base_spec, timm_cfg.get("pretrained_cfg", {}))
    warnings: list[str] = []
    if license:
        lic, note = license, "set with --license"
    elif inherited:
        lic, note = inherited, f"inherited from the base model {hub_id or base_spec}"
    else:
        lic, note = "other", "the base model's license is unknown; set it with --license"
        warnings.append(
            f"the license of {base_spec} is unknown: the card says `other`; pass --license"
        )
    stock = arch != POSTNORM_ARCH
    if not stock:
        warnings.append(
            f"{arch} (data2vec 2.0 post-norm) is not a stock timm architecture: loading the repo "
            "needs `pip install mimcli` and `import mimcli.models.postnorm` before "
            "timm.create_model (the model card says so)"
        )

    from huggingface_hub import get_token

    secrets = [get_token() or ""]
    run = scrub(run, secrets)
    tmp = dest.with_name(f".{dest.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "plots").mkdir(parents=True)
    try:
        metadata = {
            "format": "pt",
            "mimcli_version": mimcli.__version__,
            "base_model": scrub(hub_id or base_spec, secrets),
            "architecture": arch,
            "objective": str(run.get("config", {}).get("objective", "nna")),
        }
        write_bytes(tmp / "model.safetensors", safetensors_bytes(tensors, metadata))
        write_json(tmp / "config.json", _timm_config(timm_cfg))
        write_json(tmp / MARKER, run)
        plots: list[str] = []
        probe_plot, probe_model = None, ""
        if evaluation is not None:
            result, folder = evaluation
            write_json(tmp / "eval_results.json", scrub(result.to_dict(), secrets))
            for name in ("knn.png", "lowshot.png"):
                if (folder / name).is_file():
                    shutil.copyfile(folder / name, tmp / "plots" / name)
                    plots.append(f"plots/{name}")
        if probe_file is not None:
            probe_data = scrub(load_probe(probe_file), secrets)
            probe_model = str(probe_data.get("model", ""))
            if Path(probe_model).exists():  # a local path says nothing to readers of the card
                probe_model = "/".join(Path(probe_model).resolve().parts[-2:])
            write_json(tmp / "probe.json", probe_data)
            if (probe_file.parent / "probe.png").is_file():
                shutil.copyfile(probe_file.parent / "probe.png", tmp / "plots" / "probe.png")
                probe_plot = "plots/probe.png"
        teachers = [
            (scrub(source, secrets), base_model_info(source, {})[1])
            for source in teacher_sources(run)
        ]
        inputs = CardInputs(
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
            eval_columns=(
                eval_columns(evaluation[0], run_dir, base_spec, warnings)
                if evaluation
                else (None, 0)
            ),
            probe_plot=probe_plot,
            probe_model=probe_model,
            num_params=sum(t.numel() for t in tensors.values()),
            plots=plots,
        )
        # the card is built from scrubbed inputs; a second pass only removes literal secrets
        # (key patterns would mangle code such as ``return_prefix_tokens=True``)
        write_text(tmp / "README.md", scrub_literals(render_card(inputs), secrets))
        if not any((tmp / "plots").iterdir()):
            (tmp / "plots").rmdir()
        _swap_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    return RepoFolder(dest, files, arch, stock, lic, warnings)


def _default(path: Path) -> Path | None:
    return path if path.is_file() else None


def _timm_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """timm's hub config: architecture, num_features, model_args and the preprocessing."""
    out = {
        k: cfg[k]
        for k in ("architecture", "num_classes", "num_features", "global_pool", "model_args")
        if k in cfg
    }
    pretrained = dict(cfg.get("pretrained_cfg", {}))
    for key, default in (("crop_pct", 1.0), ("crop_mode", "center"), ("interpolation", "bicubic")):
        pretrained.setdefault(key, default)
    missing = [k for k in ("input_size", "mean", "std") if k not in pretrained]
    if missing:
        raise MimcliError(f"export config.json lacks pretrained_cfg {missing}; re-export the run")
    out["pretrained_cfg"] = pretrained
    return out


def _swap_into_place(tmp: Path, dest: Path) -> None:
    old = dest.with_name(f".{dest.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    if old.exists():
        shutil.rmtree(old)


# -- uploading --------------------------------------------------------------------------------


def _status(exc: BaseException) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


def _transient(exc: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        return _status(exc) in TRANSIENT_STATUS
    return is_network_error(exc)


def _retry_after(exc: BaseException) -> float | None:
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    try:
        return float(headers.get("Retry-After"))
    except (TypeError, ValueError):
        return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def with_retries(
    what: str,
    call: Callable[[], Any],
    retries: int,
    wait: float,
    on_retry: Callable[[str], None] | None = None,
) -> tuple[Any, int]:
    """``call()`` with up to ``retries`` more attempts on transient failures; (result, attempts)."""
    from huggingface_hub.errors import HfHubHTTPError

    for attempt in range(retries + 1):
        try:
            return call(), attempt + 1
        except Exception as exc:
            status = _status(exc)
            if not _transient(exc):
                if status in (401, 403):
                    raise MimcliError(
                        f"{what}: the Hub refused the token (HTTP {status}); log in with "
                        "`hf auth login` or set HF_TOKEN to a token with write access"
                    ) from exc
                if isinstance(exc, HfHubHTTPError):
                    raise RemoteError(f"{what}: the Hub refused: {_one_line(exc)}") from exc
                raise
            if attempt == retries:
                cause = f"HTTP {status}" if status else type(exc).__name__
                raise RemoteError(
                    f"{what} failed after {retries + 1} attempts ({cause}); the folder is intact, "
                    "run the same command again to resume"
                ) from exc
            delay = min(_retry_after(exc) or wait * 2**attempt, 60.0)
            if on_retry is not None:
                cause = f"HTTP {status}" if status else type(exc).__name__
                on_retry(f"{what}: {cause}; retrying in {delay:.1f}s ({attempt + 1}/{retries})")
            time.sleep(delay)
    raise AssertionError("unreachable")


def check_push_options(revision: str | None, create_pr: bool) -> None:
    if create_pr and revision not in (None, "main"):
        raise MimcliError(
            f"--create-pr opens a pull request against main, so it cannot go with --revision "
            f"{revision}: drop --revision, or push straight to that branch without --create-pr"
        )


def _require_token() -> None:
    from huggingface_hub import get_token

    if not get_token():
        raise MimcliError(
            "no Hugging Face token: log in with `hf auth login` or set HF_TOKEN (or use "
            "--dry-run --to DIR to only write the folder)"
        )


def normalize_repo_id(repo: str) -> str:
    """``repo`` checked by huggingface_hub's own rules; a pasted ``hf-hub:`` prefix is dropped."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo = repo.strip()
    if repo.startswith("hf-hub:"):
        repo = repo[len("hf-hub:") :]
    if repo.count("/") > 1 or repo.startswith("/") or repo.endswith("/"):
        raise MimcliError(f"--repo {repo!r}: expected OWNER/NAME or NAME")
    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise MimcliError(f"--repo {repo!r}: not a valid Hub repo id ({_one_line(exc)})") from exc
    return repo


def preflight(repo: str, retries: int = 4, retry_wait: float = 2.0) -> str:
    """Everything checkable before the folder is built: the repo id, offline mode, a token,
    that the endpoint answers; returns ``OWNER/NAME`` (a bare NAME gets the token's owner)."""
    from huggingface_hub import HfApi, constants

    from mimcli.hub.download import endpoint_reachable

    repo = normalize_repo_id(repo)
    if constants.HF_HUB_OFFLINE:
        raise MimcliError(
            "HF_HUB_OFFLINE is set, so nothing can be uploaded: unset it, or use --dry-run --to DIR"
        )
    _require_token()
    if not endpoint_reachable():
        raise RemoteError(
            f"cannot reach the Hub at {constants.ENDPOINT} (offline? check the network or "
            "HF_ENDPOINT), or use --dry-run --to DIR to only write the folder"
        )
    if "/" in repo:
        return repo
    who, _ = with_retries("asking the Hub who you are", HfApi().whoami, retries, retry_wait)
    return f"{who['name']}/{repo}"


def upload_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    retries: int = 4,
    retry_wait: float = 2.0,
    on_retry: Callable[[str], None] | None = None,
) -> PushResult:
    """Create ``repo_id`` if needed and upload ``folder`` as one commit."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RevisionNotFoundError

    check_push_options(revision, create_pr)
    _require_token()
    if not (folder / MARKER).is_file():
        raise MimcliError(f"{folder}: not a folder written by mimcli push")
    api = HfApi()
    attempts = 0

    def attempt(what: str, call: Callable[[], Any]) -> Any:
        nonlocal attempts
        value, n = with_retries(what, call, retries, retry_wait, on_retry)
        attempts += n
        return value

    repo_url = attempt(
        f"creating {repo_id}",
        lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"),
    )
    repo_id = getattr(repo_url, "repo_id", None) or repo_id
    branch = None if create_pr else revision
    if branch not in (None, "main"):
        attempt(
            f"creating branch {branch}",
            lambda: api.create_branch(repo_id, branch=branch, exist_ok=True),
        )

    def head() -> str | None:
        try:
            return api.repo_info(repo_id, revision=branch).sha
        except RevisionNotFoundError:
            return None

    before = attempt(f"reading {repo_id}", head)
    message = commit_message or f"Upload encoder refined with mimcli {mimcli.__version__}"
    info = attempt(
        f"uploading to {repo_id}",
        lambda: api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            revision=branch,
            commit_message=message,
            create_pr=create_pr,
        ),
    )
    return PushResult(
        repo_id=repo_id,
        repo_url=str(repo_url),
        commit_url=info.commit_url,
        commit_oid=info.oid,
        pr_url=info.pr_url,
        unchanged=(not create_pr and info.oid == before),
        attempts=attempts,
    )
