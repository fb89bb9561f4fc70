"""Tests for nanolib.core (lesson 00): devices and dtypes, seeding, the environment check, downloads.

Downloads are tested against a local HTTP server in a thread and file:// URLs: no test needs the
internet, and the server can misbehave on purpose (a transfer that stops half-way).
"""
import hashlib
import http.server
import random
import threading

import numpy as np
import pytest
import torch

import nanolib.core as core
from nanolib.core import DownloadError


# ---------------------------------------------------------------- devices and dtypes

@pytest.mark.parametrize("name", ["tpu", "xpu", "meta", "cuda:x"])
def test_unsupported_devices_get_nanolibs_message(name, monkeypatch):
    monkeypatch.delenv("NANOLIB_DEVICE", raising=False)
    with pytest.raises(ValueError, match=f"unsupported device '{name}': use 'cuda', 'cuda:N', 'mps' or 'cpu'"):
        core.get_device(name)


def test_the_environment_variable_picks_the_device_and_refuses_a_missing_one(monkeypatch):
    monkeypatch.setenv("NANOLIB_DEVICE", "cpu")
    assert core.get_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("NANOLIB_DEVICE", "cuda")
    with pytest.raises(RuntimeError, match="CUDA is not available here.*unset NANOLIB_DEVICE"):
        core.get_device()
    assert core.get_device("cpu") == torch.device("cpu"), "an argument wins over the variable"


def test_without_a_preference_the_cpu_is_last(monkeypatch):
    monkeypatch.delenv("NANOLIB_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(core, "_mps_available", lambda: False)
    assert core.get_device() == torch.device("cpu")
    monkeypatch.setattr(core, "_mps_available", lambda: True)
    assert core.get_device() == torch.device("mps")


@pytest.mark.parametrize("native_bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_get_dtype_on_cuda_asks_for_native_bf16_only(monkeypatch, native_bf16, expected):
    asked = {}

    def is_bf16_supported(including_emulation=True):
        asked["including_emulation"] = including_emulation
        return native_bf16 or including_emulation  # a T4: emulated bf16 only

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert core.get_dtype("cuda") == expected
    assert asked == {"including_emulation": False}
    assert core.get_dtype("cpu") == core.get_dtype("mps") == torch.float32


# ---------------------------------------------------------------- seeding and the environment check

def test_seed_everything_repeats_all_three_generators():
    def draw():
        return random.random(), float(np.random.rand()), torch.rand(1).item()

    core.seed_everything(2**40)  # seeds beyond numpy's 32 bits are folded, not refused
    first = draw()
    core.seed_everything(2**40)
    assert draw() == first


@pytest.mark.parametrize("seed", [-1, 1.5, "7", None])
def test_seed_everything_refuses_bad_seeds(seed):
    with pytest.raises(ValueError, match="non-negative int"):
        core.seed_everything(seed)


@pytest.mark.parametrize("version, minimum, ok", [
    ("2.13.0+cpu", "2.4", True), ("2.4.0", "2.4", True), ("2.4.0rc1", "2.4", False),
    ("3.3.26rc2", "3.3.26", False), ("1.26.0b1", "1.26", False), ("10.0", "9.9", True), ("not a version", "1.0", False)])
def test_versions_compare_as_pip_compares_them(version, minimum, ok):
    assert core._at_least(version, minimum) is ok


def test_check_environment_reports_old_and_missing_packages(capsys):
    results = core.check_environment({"numpy": ("numpy", "999.0"), "torch": ("torch", "2.0"),
                                      "no_such_pkg": ("no-such-pkg", "1.0")})
    assert results == {"numpy": False, "torch": True, "no_such_pkg": False}
    out = capsys.readouterr().out
    assert "pip install -U 'numpy>=999.0'" in out and "pip install 'no-such-pkg>=1.0'" in out


# ---------------------------------------------------------------- downloads

PAYLOAD = b"to be, or not to be\n" * 100
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        # /short: the server promises every byte, sends 400 and closes the connection
        self.wfile.write(PAYLOAD[:400] if self.path == "/short" else PAYLOAD)
        if self.path == "/short":
            self.close_connection = True

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_download_is_verified_and_then_served_from_the_cache(tmp_path, server):
    path = core.download(f"{server}/whole", "f.txt", sha256=PAYLOAD_SHA, folder=tmp_path)
    assert path.read_bytes() == PAYLOAD
    assert core.download("http://127.0.0.1:9/never-asked", "f.txt", sha256=PAYLOAD_SHA, folder=tmp_path) == path


def test_a_transfer_that_stops_half_way_is_refused_and_leaves_nothing(tmp_path, server):
    with pytest.raises(DownloadError, match=r"sent 400 of the 2,000 bytes it promised .*f\.txt: run again"):
        core.download(f"{server}/short", "f.txt", sha256=PAYLOAD_SHA, folder=tmp_path)
    assert list(tmp_path.iterdir()) == [], "no file and no temporary file"


def test_a_wrong_hash_is_refused_for_a_download_and_for_a_cached_file(tmp_path, server):
    with pytest.raises(DownloadError, match="served a file with sha256"):
        core.download(f"{server}/whole", "f.txt", sha256="0" * 64, folder=tmp_path)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f.txt").write_bytes(b"edited")
    with pytest.raises(DownloadError, match="is there but its sha256 is .*delete it"):
        core.download(f"{server}/whole", "f.txt", sha256=PAYLOAD_SHA, folder=tmp_path)


def test_an_unreachable_url_says_where_to_put_the_file(tmp_path):
    with pytest.raises(DownloadError, match=r"put the file at .*f\.txt \(sha256 "):
        core.download((tmp_path / "missing").as_uri(), "f.txt", sha256=PAYLOAD_SHA, folder=tmp_path / "cache")


def test_a_folder_that_cannot_be_written_is_not_blamed_on_the_network(tmp_path, server):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(DownloadError, match="could not write .*NANOLIB_DATA"):
        core.download(f"{server}/whole", "f.txt", sha256=PAYLOAD_SHA, folder=tmp_path / "a_file")


@pytest.mark.parametrize("sha256", [None, "abc", 42])
def test_download_needs_the_files_hash(tmp_path, sha256):
    with pytest.raises(ValueError, match="sha256 as 64 hex digits"):
        core.download("http://127.0.0.1:9/x", "f.txt", sha256=sha256, folder=tmp_path)


def test_the_gpt2_error_names_tiktokens_two_files(tmp_path, monkeypatch):
    import tiktoken
    import tiktoken.load

    def offline(*args, **kwargs):
        raise ConnectionError("no network here")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache
    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget an encoding loaded earlier
    with pytest.raises(DownloadError) as err:
        core.gpt2_encoding()
    for name in ("vocab.bpe", "encoder.json"):
        url = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/" + name
        assert f"{hashlib.sha1(url.encode()).hexdigest()} ({name})" in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_tinyshakespeare_is_fetched_through_download(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(core, "download", lambda *args, **kw: calls.append((args, kw)) or tmp_path)
    core.tinyshakespeare(folder=tmp_path)
    assert calls == [((core.TINYSHAKESPEARE_URL, "tinyshakespeare.txt"),
                      {"sha256": core.TINYSHAKESPEARE_SHA256, "folder": tmp_path})]


def test_a_hash_in_capitals_is_accepted_and_one_that_is_not_hex_is_refused(tmp_path, server):
    path = core.download(f"{server}/whole", "f.txt", sha256=PAYLOAD_SHA.upper(), folder=tmp_path)
    assert path.read_bytes() == PAYLOAD
    assert core.download(f"{server}/whole", "f.txt", sha256=PAYLOAD_SHA.upper(), folder=tmp_path) == path
    with pytest.raises(ValueError, match="64 hex digits"):
        core.download(f"{server}/whole", "g.txt", sha256="z" * 64, folder=tmp_path)
