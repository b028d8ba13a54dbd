"""Secret scrubbing of what `mimcli push` publishes (mimcli.hub.scrub)."""

from __future__ import annotations

import json

from mimcli.hub.scrub import REDACTED, scrub


def test_scrub_removes_secrets():
    run = {
        "config": {"hub_token": "abc", "lr": 1.0, "api_key": None},
        "environment": {"argv": "mimcli refine m --token hf_abcdefghijk --out r"},
        "notes": ["uses hf_ZZZZZZZZZZZZ here", "my-secret-value"],
    }
    clean = scrub(run, secrets=["my-secret-value"])
    text = json.dumps(clean)
    assert clean["config"] == {"hub_token": REDACTED, "lr": 1.0, "api_key": None}
    assert "hf_abcdefghijk" not in text and "hf_ZZZZ" not in text
    assert "my-secret-value" not in text
    assert clean["environment"]["argv"] == f"mimcli refine m --token {REDACTED} --out r"
    leaky = [
        "https://bucket.s3.amazonaws.com/w.pth?X-Amz-Signature=abc&X-Amz-Security-Token=def",
        "https://user:hunter2@example.com/w.pth",
        "login password=hunter2 now",
        "--wandb-key abcdef123",
        {"auth": {"pass": "hunter2"}},
    ]
    text = json.dumps(scrub(leaky))
    for secret in ("X-Amz-Signature=abc", "def", "hunter2", "abcdef123"):
        assert secret not in text, secret
    assert "https://bucket.s3.amazonaws.com/w.pth?<redacted>" in text
