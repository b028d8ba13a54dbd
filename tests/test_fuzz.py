"""Property-based fuzzing of the loaders and parsers (hypothesis): mutated safetensors headers,
truncated/garbled/hostile pickles, random config.json files (run folders, the resume path, timm
folders), random block lists, MODEL specs, data source strings and tracker names.

The property everywhere: a case is accepted, or it raises exactly ``MimcliError`` with a one-line
message; nothing else escapes, no pickle runs code, nothing hangs (hypothesis deadlines) or
allocates what a header claims (one subprocess under ``RLIMIT_AS``).

Derandomised, so CI sees the same cases every run. ``MIMCLI_FUZZ_EXAMPLES=N`` multiplies the
number of cases (e.g. 20 for a long local run); the count that ran is printed at the end of the
module (``pytest -s``) and checked per test.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import pickle
import resource
import struct
import subprocess
import sys
import textwrap
import zipfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from mimcli.blocks import MAX_BLOCK, parse_blocks, resolve_blocks
from mimcli.errors import MimcliError
from mimcli.refine.config import RefineConfig
from mimcli.refine.setup import (
    check_resume,
    resume_num_heads,
    settle_resize_rule,
    validate,
    with_saved_options,
)
from mimcli.runs import RunFolder

SCALE = max(1, int(os.environ.get("MIMCLI_FUZZ_EXAMPLES", "1")))
CASES: Counter[str] = Counter()


def fuzz(n: int, deadline_ms: int = 2000):
    """Hypothesis settings for one fuzz test: ``n`` cases (times MIMCLI_FUZZ_EXAMPLES),
    derandomised, a per-case deadline."""
    return settings(
        max_examples=n * SCALE,
        deadline=deadline_ms,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    total = sum(CASES.values())
    detail = ", ".join(f"{k} {v}" for k, v in sorted(CASES.items()))
    print(f"\ntest_fuzz: {total} fuzzed cases ran ({detail})")


def accepts_or_one_line(name: str, call, *args, **kwargs):
    """Run one case: its result, or None after a one-line MimcliError; anything else fails."""
    CASES[name] += 1
    try:
        return call(*args, **kwargs)
    except MimcliError as exc:
        assert type(exc) is MimcliError, f"{name}: {type(exc).__name__}, not MimcliError"
        text = str(exc)
        assert text.strip(), f"{name}: empty MimcliError"
        assert "\n" not in text and "\r" not in text, f"{name}: multi-line message {text!r}"
        return None


def counted(name: str, minimum: int):
    """Outermost on a hypothesis test: after its search, at least ``minimum`` cases (times
    MIMCLI_FUZZ_EXAMPLES) of ``name`` must have run, so a strategy that filters everything out
    fails instead of passing empty."""

    def wrap(test):
        @functools.wraps(test)
        def run(*args, **kwargs):
            before = CASES[name]
            test(*args, **kwargs)
            ran = CASES[name] - before
            assert ran >= minimum * SCALE, f"{name}: only {ran} cases ran"

        return run

    return wrap


# ---------------------------------------------------------------- safetensors headers

DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3"]
HUGE = [0, 1, 3, 2**31, 2**32 + 1, 2**40, 2**53, 2**63 - 1, 2**64 - 1]


def _valid_safetensors() -> bytes:
    return st_save(
        {
            "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
            "b": torch.ones(4, dtype=torch.int64),
        },
        metadata={"format": "pt"},
    )


def _split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _pack(header: object, data: bytes, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


ints = st.one_of(st.integers(-5, 64), st.sampled_from(HUGE), st.integers(-(2**63), 2**64 - 1))
tensor_entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.one_of(st.sampled_from(DTYPES), st.text(max_size=6), ints),
        "shape": st.one_of(st.lists(ints, max_size=5), ints, st.text(max_size=4)),
        "data_offsets": st.one_of(st.lists(ints, min_size=0, max_size=3), st.none()),
    },
)


@st.composite
def safetensors_blobs(draw) -> bytes:
    header, data = _split(_valid_safetensors())
    how = draw(st.sampled_from(["entries", "length", "truncate", "flip", "raw"]))
    if how == "entries":
        for name in draw(st.lists(st.sampled_from(["a", "b", "c", "__metadata__"]), max_size=3)):
            if name == "__metadata__":
                header[name] = draw(
                    st.one_of(st.dictionaries(st.text(max_size=3), st.text(max_size=3)), ints)
                )
            else:
                entry = dict(header.get(name, {}))
                entry.update(draw(tensor_entry))
                header[name] = entry
        return _pack(header, data)
    if how == "length":  # the 8-byte prefix claims another header size (up to 2**64-1)
        return _pack(header, data, draw(ints.filter(lambda v: 0 <= v < 2**64)))
    blob = _pack(header, data)
    if how == "truncate":
        return blob[: draw(st.integers(0, len(blob) - 1))]
    if how == "flip":
        pos = draw(st.integers(0, len(blob) - 1))
        return blob[:pos] + bytes([draw(st.integers(0, 255))]) + blob[pos + 1 :]
    return _pack(draw(st.binary(max_size=60)), draw(st.binary(max_size=64)))


@counted("safetensors", 250)
@fuzz(300)
@given(blob=safetensors_blobs())
def test_mutated_safetensors_are_read_or_refused_in_one_line(tmp_path_factory, blob):
    from mimcli.models.checkpoints import read_checkpoint

    path = tmp_path_factory.getbasetemp() / "fuzz.safetensors"
    path.write_bytes(blob)
    out = accepts_or_one_line("safetensors", read_checkpoint, path)
    if out is not None:
        assert all(isinstance(v, torch.Tensor) for v in out.values())
        assert sum(v.numel() * v.element_size() for v in out.values()) <= len(blob)


def test_a_header_claiming_a_terabyte_fails_cleanly_under_a_memory_limit(tmp_path):
    """1 TB in the shape and offsets, and a 2**40-byte header length: one line each, under a
    2 GiB address-space limit (an allocation of what the header claims would be MemoryError)."""
    data = b"\0" * 16
    tb = 2**40
    files = {
        "shape.safetensors": _pack(
            {"w": {"dtype": "F32", "shape": [2**18, 2**20], "data_offsets": [0, tb]}}, data
        ),
        "length.safetensors": struct.pack("<Q", tb) + b"{}",
        "offsets.safetensors": _pack(
            {"w": {"dtype": "U8", "shape": [tb], "data_offsets": [0, tb]}}, data
        ),
    }
    for name, blob in files.items():
        (tmp_path / name).write_bytes(blob)
    script = textwrap.dedent(
        """
        import resource, sys
        import torch
        from mimcli.errors import MimcliError
        from mimcli.models.checkpoints import read_checkpoint

        with open("/proc/self/statm") as fh:
            used = int(fh.read().split()[0]) * resource.getpagesize()
        limit = used + 2 * 2**30
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        for path in sys.argv[1:]:
            try:
                read_checkpoint(path)
                print("ACCEPTED", path)
            except MimcliError as exc:
                assert "\\n" not in str(exc)
                print("REFUSED", path, str(exc)[:80])
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-c", script, *(str(tmp_path / n) for n in files)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("REFUSED") == len(files), proc.stdout
    CASES["terabyte header"] += len(files)


# ---------------------------------------------------------------- pickles


class Hostile:
    """Pickles as a call that would leave a marker file behind."""

    def __init__(self, how: str, marker: Path) -> None:
        self.how, self.marker = how, str(marker)

    def __reduce__(self):
        if self.how == "system":
            return (os.system, (f"touch {self.marker}",))
        if self.how == "open":
            return (open, (self.marker, "w"))
        if self.how == "exec":
            return (exec, (f"open({self.marker!r}, 'w').close()",))
        return (Path.touch, (Path(self.marker),))


def _torch_bytes(obj: object, zip_format: bool) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=zip_format)
    return buf.getvalue()


@st.composite
def pickle_blobs(draw, marker: Path) -> bytes:
    state = {"w": torch.arange(4.0), "n": 3, "cfg": {"lr": 0.1}}
    if draw(st.booleans()):
        how = draw(st.sampled_from(["system", "open", "exec", "touch"]))
        where = draw(st.sampled_from(["top", "nested", "value"]))
        bomb = Hostile(how, marker)
        obj = (
            bomb
            if where == "top"
            else {"model": state, "args": [bomb] if where == "nested" else bomb}
        )
    else:
        obj = state
    kind = draw(st.sampled_from(["zip", "legacy", "plain"]))
    blob = pickle.dumps(obj, protocol=2) if kind == "plain" else _torch_bytes(obj, kind == "zip")
    cut = draw(st.sampled_from(["whole", "truncate", "flip", "garble"]))
    if cut == "truncate":
        blob = blob[: draw(st.integers(0, len(blob) - 1))]
    elif cut == "flip":
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, len(blob) - 1))
            blob = blob[:pos] + bytes([draw(st.integers(0, 255))]) + blob[pos + 1 :]
    elif cut == "garble":
        blob = draw(st.binary(max_size=200))
    return blob


@pytest.fixture(scope="module")
def pickle_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("pickles")


@counted("pickle", 150)
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@fuzz(200, deadline_ms=5000)
@given(data=st.data(), suffix=st.sampled_from([".pth", ".pt", ".th"]))
def test_truncated_garbled_and_hostile_pickles_never_run_code(pickle_dir, data, suffix):
    from mimcli.models.checkpoints import read_checkpoint

    marker = pickle_dir / "MARKER"
    blob = data.draw(pickle_blobs(marker))
    path = pickle_dir / f"fuzz{suffix}"
    path.write_bytes(blob)
    out = accepts_or_one_line("pickle", read_checkpoint, path)
    assert not marker.exists(), "a pickle ran code"
    if out is not None:
        assert isinstance(out, dict)


def test_a_hostile_pickle_loads_as_inert_data(tmp_path):
    """The bombs are real: plain pickle.load would leave the marker (checked once, here, on
    a file we wrote ourselves); mimcli's loader keeps them inert."""
    from mimcli.models.checkpoints import OpaqueObject, read_checkpoint

    marker = tmp_path / "MARKER"
    blob = _torch_bytes({"model": {"w": torch.ones(1)}, "args": Hostile("open", marker)}, True)
    (tmp_path / "bomb.pth").write_bytes(blob)
    out = read_checkpoint(tmp_path / "bomb.pth")
    assert not marker.exists() and isinstance(out["args"], OpaqueObject)
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:  # the file does name the call it wants
        inner = next(n for n in zf.namelist() if n.endswith("data.pkl"))
        assert b"open" in zf.read(inner)


# ---------------------------------------------------------------- block lists and option strings

block_texts = st.one_of(
    st.text(alphabet="0123456789,- all", max_size=30),
    st.lists(
        st.one_of(
            st.integers(-3, 3000).map(str),
            st.tuples(st.integers(0, 10**12), st.integers(0, 10**12)).map(
                lambda t: f"{t[0]}-{t[1]}"
            ),
        ),
        min_size=1,
        max_size=6,
    ).map(",".join),
    st.sampled_from(
        ["auto", "last4", "last0", "last-1", "last" + "9" * 30, "1-20000000", "²", "１"]
    ),
    st.text(max_size=20),
)


@counted("blocks", 600)
@fuzz(400, deadline_ms=1000)
@given(text=block_texts, depth=st.integers(1, 64))
def test_block_lists_are_parsed_or_refused_cheaply(text, depth):
    parsed = accepts_or_one_line("blocks", parse_blocks, text)
    if parsed is not None:
        assert parsed == sorted(set(parsed)) and all(0 <= b <= MAX_BLOCK for b in parsed)
    resolved = accepts_or_one_line("blocks", resolve_blocks, text, depth, None)
    if resolved is not None:
        assert resolved[0] and all(1 <= b <= depth for b in resolved[0])


def test_absurd_block_ranges_are_refused_without_building_them():
    for text in ("1-20000000", "1-1025", "5-" + "9" * 4000):
        with pytest.raises(MimcliError, match="--blocks"):
            parse_blocks(text)
    assert parse_blocks("1-1024") == list(range(1, 1025))


@counted("model spec", 200)
@fuzz(300, deadline_ms=1000)
@given(
    source=st.one_of(
        st.sampled_from(["vit_base_patch16_224.mae", "ckpt.pth", "", " "]), st.text(max_size=12)
    ),
    suffix=st.one_of(
        st.sampled_from(
            [
                "",
                "#heads=",
                "#heads=16",
                "#heads=0",
                "#heads=-1",
                "#heads=²",
                "#heads=" + "9" * 5000,
            ]
        ),
        st.text(max_size=8).map(lambda t: "#heads=" + t),
    ),
)
def test_model_specs_are_parsed_or_refused(source, suffix):
    from mimcli.models.spec import MAX_HEADS, model_source, parse_model_spec

    spec = accepts_or_one_line("model spec", parse_model_spec, source + suffix)
    if spec is not None:
        assert spec.num_heads is None or 1 <= spec.num_heads <= MAX_HEADS
        assert model_source(source + suffix) == spec.source


@counted("data source", 200)
@fuzz(300, deadline_ms=1000)
@given(
    text=st.one_of(
        st.text(max_size=20),
        st.builds(
            "{}{}".format,
            st.sampled_from(["wds/", "hfds/", "hfids/", "", "wds/s-{", "wds/{0.."]),
            st.text(alphabet="{}.,0123456789:/ab-", max_size=24),
        ),
        st.sampled_from(["wds/{0..99999999}.tar", "wds/" + "{0..9}" * 12, "wds/{000..009}.tar"]),
    )
)
def test_data_source_strings_are_parsed_or_refused(text):
    from mimcli.datasources import MAX_SHARDS, _split, data_spec, expand_shards, is_source

    CASES["data source"] += 1
    kept = data_spec(text)
    assert (isinstance(kept, str) and is_source(text)) or isinstance(kept, Path)
    name, split = _split(text)
    assert isinstance(name, str) and isinstance(split, str)
    if text.startswith("wds/"):
        shards = accepts_or_one_line("data source", expand_shards, text[4:], text)
        if shards is not None:
            assert 1 <= len(shards) <= MAX_SHARDS


@counted("trackers", 50)
@fuzz(100, deadline_ms=1000)
@given(
    names=st.lists(
        st.one_of(
            st.sampled_from(["tensorboard", "wandb", "mlflow", "trackio"]), st.text(max_size=10)
        ),
        max_size=3,
    )
)
def test_tracker_names_are_checked_in_one_line(names):
    from mimcli.trackers import check_trackers

    accepts_or_one_line("trackers", check_trackers, names)


# ---------------------------------------------------------------- config.json files

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=10,
)
REFINE_FIELDS = [
    "objective", "num_heads", "blocks", "epochs", "steps", "batch_size", "lr", "global_scale",
    "local_scale", "pos_embed_resize", "teacher", "trackers", "data", "val", "probe", "decoder",
    "ema", "topk", "head_width", "queue_size", "shard", "export", "seed", "num_workers",
    "freeze_blocks", "val_limit", "local_crops", "photometric", "augment_on", "head_input",
]  # fmt: skip


@st.composite
def run_configs(draw) -> bytes:
    """config.json of a run folder: garbage bytes, any JSON, or the recorded layout with random
    values under real option names."""
    how = draw(st.sampled_from(["bytes", "json", "layout", "layout"]))
    if how == "bytes":
        return draw(st.one_of(st.binary(max_size=40), st.just(b"[" * 100_000)))
    if how == "json":
        return json.dumps(draw(json_values)).encode()
    config = draw(st.dictionaries(st.sampled_from(REFINE_FIELDS), json_values, max_size=6))
    record = {"config": config}
    if draw(st.booleans()):
        record["resolved"] = draw(
            st.one_of(json_values, st.fixed_dictionaries({"num_heads": json_values}))
        )
    if draw(st.booleans()):
        record = {"config": draw(json_values)}
    return json.dumps(record).encode()


@counted("run config", 200)
@fuzz(200, deadline_ms=2000)
@given(
    blob=run_configs(),
    metrics=st.lists(st.one_of(st.text(max_size=12), json_values.map(json.dumps)), max_size=4),
)
def test_run_folder_configs_are_read_or_refused(tmp_path_factory, blob, metrics):
    root = tmp_path_factory.getbasetemp() / "fuzz-run"
    root.mkdir(exist_ok=True)
    (root / "config.json").write_bytes(blob)
    (root / "metrics.jsonl").write_text("\n".join(metrics))
    (root / "checkpoint.safetensors").write_bytes(b"")
    run = RunFolder(root)
    record = accepts_or_one_line("run config", run.read_config)
    assert record is None or isinstance(record, dict)
    saved = run.saved_options()
    assert saved is None or isinstance(saved, dict)
    assert all(isinstance(r, dict) for r in run.metrics())
    cfg = RefineConfig(model="m", data=root, out=root, resume=True)
    cfg = accepts_or_one_line("run config", with_saved_options, cfg, set())
    if cfg is None:
        return
    cfg = replace(cfg, resume=True, out=root)
    accepts_or_one_line("run config", resume_num_heads, cfg, run)
    accepts_or_one_line("run config", settle_resize_rule, cfg, run)
    accepts_or_one_line("run config", validate, cfg, 1, run)
    accepts_or_one_line("run config", check_resume, cfg, run, 2)


@contextlib.contextmanager
def address_space_headroom(gib: float):
    """Lower this process's soft RLIMIT_AS to its current size + ``gib`` (the hard limit stays,
    so it is raised back after): an allocation of what a config claims fails as MemoryError /
    RuntimeError here instead of exhausting the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as fh:
        used = int(fh.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + int(gib * 2**30), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


ARCHS = ["vit_base_patch16_224", "vit_giant_patch14_224", "vit_small_patch16_224", "resnet50"]
MODEL_ARGS = ["embed_dim", "depth", "num_heads", "img_size", "patch_size", "mlp_ratio", "foo"]
arg_values = st.one_of(
    st.sampled_from([0, 1, 2, 4, 8, 32, 48, 1024, 4096, 2**20, 2**40, -8, 0.5, 1e9]), json_values
)


@st.composite
def folder_configs(draw) -> bytes:
    from tests.conftest import TINY_ARGS

    how = draw(st.sampled_from(["bytes", "json", "layout", "layout", "layout"]))
    if how == "bytes":
        return draw(st.binary(max_size=30))
    if how == "json":
        return json.dumps(draw(json_values)).encode()
    args = dict(TINY_ARGS)
    args.update(draw(st.dictionaries(st.sampled_from(MODEL_ARGS), arg_values, max_size=3)))
    config = {
        "architecture": draw(st.one_of(st.sampled_from(ARCHS), json_values)),
        "model_args": args if draw(st.integers(0, 5)) else draw(json_values),
        "num_classes": 0,
        "num_features": 32,
        "pretrained_cfg": {"input_size": [3, 32, 32]},
    }
    if draw(st.integers(0, 4)) == 0:  # transformers' data2vec-vision layout, random sizes
        keys = ["hidden_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size", "layer_norm_eps", "layer_scale_init_value", "hidden_act"]  # fmt: skip
        config = {"model_type": "data2vec-vision"}
        config.update(draw(st.dictionaries(st.sampled_from(keys), arg_values, max_size=4)))
    elif draw(st.integers(0, 3)) == 0:
        config.update(
            draw(
                st.dictionaries(
                    st.sampled_from(
                        ["num_classes", "pretrained_cfg", "model_type", "num_features"]
                    ),
                    json_values,
                    max_size=2,
                )
            )
        )
    return json.dumps(config).encode()


@counted("timm folder", 45)
@fuzz(60, deadline_ms=10000)
@given(blob=folder_configs())
def test_timm_folder_configs_load_or_are_refused(tiny_model_dir, blob):
    from mimcli.models.sources import load_model

    (tiny_model_dir / "config.json").write_bytes(blob)
    with address_space_headroom(3):
        loaded = accepts_or_one_line("timm folder", load_model, str(tiny_model_dir))
    if loaded is not None:
        assert loaded.num_blocks >= 1


def test_a_folder_config_claiming_a_giant_model_is_refused_before_building_it(tiny_model_dir):
    from mimcli.models.sources import load_model

    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["architecture"] = "vit_giant_patch14_224"
    config["model_args"] = {}
    (tiny_model_dir / "config.json").write_text(json.dumps(config))
    with address_space_headroom(3), pytest.raises(MimcliError, match="parameters but"):
        load_model(str(tiny_model_dir))
    config["model_args"] = {"depth": 10**6}
    (tiny_model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(MimcliError, match="depth=1000000 is out of range"):
        load_model(str(tiny_model_dir))


option_texts = st.one_of(
    st.sampled_from(["auto", "AUTO", "paper", "0", "8", "16", "²", "-1", "9" * 30, " 64 ", ""]),
    st.text(max_size=8),
    st.integers(-5, 2**40),
)


@counted("auto or N", 450)
@fuzz(200, deadline_ms=1000)
@given(spec=option_texts, size=st.integers(0, 10**6))
def test_auto_or_count_options_are_parsed_or_refused(spec, size):
    from mimcli.datasources import _label_value
    from mimcli.heads import MAX_WIDTH, head_widths
    from mimcli.queue import MAX_QUEUE_SIZE, queue_size
    from mimcli.runtime import MAX_WORKERS, resolve_workers

    n = accepts_or_one_line("auto or N", queue_size, spec, size)
    assert n is None or 1 <= n <= MAX_QUEUE_SIZE
    widths = accepts_or_one_line("auto or N", head_widths, 768, spec)
    assert widths is None or 8 <= widths.hidden <= MAX_WIDTH
    workers = accepts_or_one_line("auto or N", resolve_workers, spec)
    assert workers is None or 0 <= workers[0] <= max(MAX_WORKERS, os.cpu_count() or 1)
    label = _label_value(str(spec).encode())
    assert isinstance(label, int | str)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("num_hidden_layers", 10**12, "not in 1..1024"), ("hidden_size", "abc", "not a whole number"),
     ("patch_size", 0, "not in 1..8192"), ("image_size", [224, None], "not a whole number"),
     ("layer_norm_eps", [1], "not a number")],
)  # fmt: skip
def test_data2vec_vision_configs_with_bad_sizes_are_one_line(tiny_model_dir, field, value, message):
    from mimcli.models.sources import load_model

    config = {"model_type": "data2vec-vision", field: value}
    (tiny_model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(MimcliError, match=message):
        load_model(str(tiny_model_dir))


# ---------------------------------------------------------------- checkpoint contents

VIT_KEYS = [
    "patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed", "reg_token",
    "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.mlp.fc1.weight",
    "blocks.1.norm1.weight", "blocks.3.norm1.weight", "blocks.0.ls1.gamma", "norm.weight",
    "fc_norm.weight", "cls_tokens.tokens", "pos_embed.embed", "embed_norm.weight",
    "decoder_embed.weight", "mask_token", "head.weight",
    "modality_encoders.IMAGE.local_encoder.proj.weight", "blocks.99999999.norm1.weight",
]  # fmt: skip
shapes = st.lists(st.one_of(st.integers(0, 8), st.sampled_from([16, 32, 64])), max_size=4)


@st.composite
def checkpoint_contents(draw) -> dict:
    keys = draw(st.lists(st.one_of(st.sampled_from(VIT_KEYS), st.text(max_size=8)), max_size=8))
    weights = {k: torch.zeros(draw(shapes)) for k in keys}
    wrap = draw(st.sampled_from(["flat", "model", "state_dict", "module."]))
    if wrap == "module.":
        return {"module." + k: v for k, v in weights.items()}
    top: dict = weights if wrap == "flat" else {wrap: weights}
    if draw(st.booleans()):
        top["args"] = draw(st.dictionaries(st.sampled_from(["num_heads", "model"]), json_values))
    return top


@counted("checkpoint contents", 120)
@fuzz(150, deadline_ms=10000)
@given(top=checkpoint_contents(), suffix=st.sampled_from([".pth", ".safetensors"]))
def test_checkpoints_with_odd_keys_and_shapes_load_or_are_refused(pickle_dir, top, suffix):
    from safetensors.torch import save_file

    from mimcli.models.sources import load_model

    path = pickle_dir / f"odd{suffix}"
    if suffix == ".safetensors":
        flat = {k: v for k, v in top.items() if isinstance(v, torch.Tensor)}
        save_file(flat, str(path))
    else:
        torch.save(top, path)
    with address_space_headroom(3):
        loaded = accepts_or_one_line("checkpoint contents", load_model, str(path))
    if loaded is not None:
        assert loaded.num_blocks >= 1


def test_cases_found_by_long_runs_stay_one_line(tmp_path):
    """Found with MIMCLI_FUZZ_EXAMPLES=20: a dtype holding a line break came back inside the
    safetensors error; a class name with a NUL byte made building its inert stub raise
    ValueError."""
    from mimcli.models.checkpoints import read_checkpoint

    header, data = _split(_valid_safetensors())
    header["a"]["dtype"] = "\r"
    (tmp_path / "cr.safetensors").write_bytes(_pack(header, data))
    with pytest.raises(MimcliError) as err:
        read_checkpoint(tmp_path / "cr.safetensors")
    assert "\r" not in str(err.value) and "\n" not in str(err.value)
    blob = _torch_bytes({"w": torch.arange(4.0)}, True)
    assert blob.count(b"FloatStorage") == 1
    (tmp_path / "nul.pth").write_bytes(blob.replace(b"FloatStorage", b"\0loatStorage"))
    with pytest.raises(MimcliError, match="weights-only torch checkpoint"):
        read_checkpoint(tmp_path / "nul.pth")
