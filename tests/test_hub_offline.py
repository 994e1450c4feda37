"""Hub ids (issue 10, item 7): the local cache first, HF_HUB_OFFLINE honoured with no network at all, and a
clear one-line error within seconds when the id is not cached and the hub is unreachable."""
import socket
import time

import pytest

from diffedit_engine.weights import files


@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt is recorded and refused; the test asserts how many there were."""
    attempts = []

    def refuse(*a, **kw):
        attempts.append(a)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    for var in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(files, "download", lambda *a: pytest.fail("download must not be attempted"))
    return tmp_path / "cache"


def fake_snapshot(cache, repo_id, commit="0123abcd"):
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "snapshots" / commit / "unet").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_cached_id_uses_no_network(hub_env, no_network):
    snap = fake_snapshot(hub_env, "org/model")
    assert files.resolve("org/model") == snap
    assert no_network == []


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_offline_env_means_no_network(hub_env, no_network, monkeypatch, value):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError) as e:
        files.resolve("org/absent")
    msg = str(e.value)
    assert "org/absent" in msg and "HF_HUB_OFFLINE" in msg and "\n" not in msg
    assert no_network == [] and time.monotonic() - t0 < 1


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: a connect is refused at once
    return port


def test_unreachable_hub_fails_at_once(hub_env, monkeypatch):
    port = free_port()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError) as e:
        files.resolve("org/absent")
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert "org/absent" in msg and "unreachable" in msg and f"127.0.0.1:{port}" in msg and "\n" not in msg


def test_hanging_network_fails_within_the_probe_timeout(hub_env, monkeypatch):
    """A lookup or SYN that never answers (a black-holed route, a dead DNS server) ends at the timeout."""
    def hang(*a, **kw):  # the abandoned probe thread ends as a real connect would: with an OSError, no traceback
        time.sleep(30)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    monkeypatch.setattr(files, "PROBE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(files.probe, "__defaults__", (0.5,))
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError, match="no answer within 0.5 s"):
        files.resolve("org/absent")
    assert time.monotonic() - t0 < 5


def test_default_probe_timeout_is_a_few_seconds():
    assert 0 < files.PROBE_TIMEOUT_S <= 5 and files.probe.__defaults__ == (files.PROBE_TIMEOUT_S,)


def test_reachable_hub_downloads(hub_env, monkeypatch, tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setattr(files, "download", lambda repo_id, revision, fp16: tmp_path / "downloaded")
        assert files.resolve("org/remote") == tmp_path / "downloaded"
    finally:
        server.close()


def test_proxy_is_probed_instead_of_the_hub(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert files.hub_endpoint() == ("proxy.example", 3128)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert files.hub_endpoint() == ("huggingface.co", 443)
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example:8443/")
    assert files.hub_endpoint() == ("hf-mirror.example", 8443)


def test_download_errors_are_one_line(hub_env, monkeypatch):
    monkeypatch.setattr(files, "probe", lambda host, port, timeout=None: None)

    def boom(*a):
        raise RuntimeError("401 Client Error\nRepository Not Found for url: https://huggingface.co/api/x")

    monkeypatch.setattr(files, "download", boom)
    with pytest.raises(FileNotFoundError) as e:
        files.resolve("org/gated")
    assert "\n" not in str(e.value) and "Repository Not Found" in str(e.value)
