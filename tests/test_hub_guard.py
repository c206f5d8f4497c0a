"""Loading a model by hub id where the Hugging Face hub cannot be reached (issue #11): fail at once,
or load a cached copy without waiting for huggingface_hub's retries."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchcap.items import FatalError
from batchcap.models import common
from tests.helpers import run_cli

HASH = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def unreachable_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """Online mode, an empty hub cache, and a hub endpoint on a closed loopback port (refuses at once,
    as a machine without network does; huggingface_hub would retry every file 5 times with backoff)."""
    from huggingface_hub import constants

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(common, "_probed", {})
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield cache


@pytest.mark.timeout(30)  # without the guard this takes ~50 s of retries
def test_bogus_hub_id_fails_at_once(unreachable_hub: Path, tmp_path: Path) -> None:
    from huggingface_hub import constants

    code, output = run_cli("audio", str(tmp_path), "-o", str(tmp_path / "o.parquet"), "--model",
                           "someuser/no-such-model-xyz")
    assert code == 1
    assert output.strip().splitlines()[-1] == (
        f"Error: cannot load model 'someuser/no-such-model-xyz': the Hugging Face hub ({constants.ENDPOINT}) "
        f"cannot be reached from here and the model is not in the local cache ({common._hf_home()}). Download it "
        "where there is network (huggingface-cli download), or pass --model /path/to/a/local/model/dir")
    assert constants.HF_HUB_OFFLINE is False


@pytest.mark.timeout(60)
def test_cached_hub_id_loads_without_the_hub(unreachable_hub: Path, tiny_whisper_en: str) -> None:
    from huggingface_hub import constants

    from batchcap.models.whisper import WhisperTranscriber

    repo = unreachable_hub / "models--someuser--cached-whisper"
    shutil.copytree(tiny_whisper_en, repo / "snapshots" / HASH)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HASH)
    model = WhisperTranscriber("someuser/cached-whisper", device="cpu", dtype="float32")
    assert model.model.config.d_model > 0
    assert constants.HF_HUB_OFFLINE is False  # offline only while loading
    with pytest.raises(FatalError, match="cannot be reached from here and the model is not in the local cache"):
        WhisperTranscriber("someuser/other-whisper", device="cpu")


def test_local_dirs_and_offline_runs_are_not_probed(monkeypatch: pytest.MonkeyPatch, tiny_whisper_en: str) -> None:
    def no_probe(timeout: float = 0) -> bool:
        raise AssertionError("probed")

    monkeypatch.setattr(common, "hub_reachable", no_probe)
    with common.hub_guard(tiny_whisper_en):
        pass
    with common.hub_guard("./not/a/hub/id", "/abs/dir"):
        pass
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with common.hub_guard("someuser/any-model"):
        pass
