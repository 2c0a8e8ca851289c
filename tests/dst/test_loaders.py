"""Loaders: the data files scikit-learn ships, read without importing scikit-learn.

(The on-disk formats of the paper's datasets are tested through the registry, in
``test_datasets.py``.)"""

from __future__ import annotations

import http.server
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from dst.datasets import DataConfig, DatasetUnavailableError, load_dataset
from dst.loaders import (
    breast_cancer_arrays,
    digits_arrays,
    download_archive,
    download_problem,
    fetch_once,
    lock_file,
)


@pytest.mark.parametrize("name", ["digits", "breast_cancer"])
def test_scikit_learn_data_read_from_its_files_equals_its_loaders(name: str) -> None:
    """Read without importing scikit-learn (seconds saved in every trial process), the arrays
    are exactly its loader's."""
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, f"load_{name}")()
    x, y = {"digits": digits_arrays, "breast_cancer": breast_cancer_arrays}[name]()
    assert x.dtype == np.float64 and y.dtype == np.int64
    np.testing.assert_array_equal(x, bunch.data)
    np.testing.assert_array_equal(y, bunch.target)


UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, a connection is refused


def refused_openml(**kwargs: object) -> None:
    """scikit-learn's OpenML fetch, asking a server that is not there."""
    import urllib.request

    urllib.request.urlopen(f"{UNREACHABLE}/api/v1/json/data/44129", timeout=5)


@pytest.mark.parametrize(
    ("name", "url", "expected"),
    [
        ("cifar10", f"{UNREACHABLE}/cifar-10-python.tar.gz",
         "cifar-10-batches-py/ (that archive unpacked)"),
        ("cifar100", f"{UNREACHABLE}/cifar-100-python.tar.gz",
         "cifar-100-python/ (that archive unpacked)"),
        ("tiny-imagenet", f"{UNREACHABLE}/tiny-imagenet-200.zip",
         "tiny-imagenet-200/ (that archive unpacked)"),
        ("fashion-mnist", f"{UNREACHABLE}/",
         "FashionMNIST/raw/ with its four unpacked *-ubyte files"),
        ("higgs", "https://www.openml.org/d/44129", "higgs/higgs.npz (arrays X and y)"),
    ],
)  # fmt: skip
def test_a_failed_download_is_one_line_naming_the_url_and_how_to_run_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, url: str, expected: str
) -> None:
    """The server cannot be reached: the error names what was asked of whom and what to put
    where instead, and leaves no partial archive a later run would take for the whole one."""
    import torchvision.datasets

    monkeypatch.setattr("dst.loaders.CIFAR_URL", UNREACHABLE + "/{}.tar.gz")
    monkeypatch.setattr("dst.loaders.TINY_URL", f"{UNREACHABLE}/tiny-imagenet-200.zip")
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "mirrors", [f"{UNREACHABLE}/"])
    monkeypatch.setattr("sklearn.datasets.fetch_openml", refused_openml)
    with pytest.raises(DatasetUnavailableError) as raised:
        load_dataset(name, DataConfig(root=tmp_path, download=True))
    message = str(raised.value)
    assert re.fullmatch(
        re.escape(f"dataset {name!r}: downloading {url} failed (")
        + r"\[Errno \d+\] Connection refused"
        + re.escape(
            f"). To run without downloading, put {expected} under the data root {tmp_path} "
            "(data.root, or $DST_DATA_DIR) and set data.download: false"
        ),
        message,
    ), message
    found = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert found == [lock_file(tmp_path, name)]  # no partial download, only the lock


def test_a_download_problem_is_the_reason_on_one_line() -> None:
    """An HTTP status with its reason; a network error's reason; a library's several-line
    message by its last line."""
    import urllib.error
    from email.message import Message

    gone = urllib.error.HTTPError("http://x/a.tgz", 404, "Not Found", Message(), None)
    assert download_problem(gone) == "HTTP 404 Not Found"
    refused = urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))
    assert download_problem(refused) == "[Errno 111] Connection refused"
    tried = RuntimeError("Error downloading a.gz:\nTried http://m/, got:\n<urlopen error boom>\n")
    assert download_problem(tried) == "boom"


class CutShort(http.server.BaseHTTPRequestHandler):
    """A server whose answer ends after 10 of the 1,000 bytes it announces."""

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.end_headers()

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"\x1f\x8b" + b"\0" * 8)
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(
    ("name", "archive", "problem"),
    [
        ("cifar10", "cifar-10-python.tar.gz", "File not found or corrupted."),  # its md5
        ("tiny-imagenet", "tiny-imagenet-200.zip",  # no md5 known: unpacking finds it out
         "the archive is cut short or corrupt: File is not a zip file"),
    ],
)  # fmt: skip
def test_a_download_cut_short_leaves_nothing_a_later_run_would_take_for_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, archive: str, problem: str
) -> None:
    """The server's answer ends early (urllib does not say so): the archive is found out,
    said to be cut short, and removed; no unpacked folder is left either."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CutShort)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr("dst.loaders.CIFAR_URL", base + "/{}.tar.gz")
    monkeypatch.setattr("dst.loaders.TINY_URL", f"{base}/tiny-imagenet-200.zip")
    try:
        with pytest.raises(DatasetUnavailableError) as raised:
            load_dataset(name, DataConfig(root=tmp_path, download=True))
    finally:
        server.shutdown()
        server.server_close()
    assert str(raised.value).startswith(
        f"dataset {name!r}: downloading {base}/{archive} failed ({problem}). To run without "
        "downloading, put "
    )
    assert list(tmp_path.iterdir()) == [lock_file(tmp_path, name)]


def test_a_whole_archive_is_unpacked_in_place(tmp_path: Path) -> None:
    """What the archive holds lands under the data root as it is in the archive."""
    import functools
    import tarfile

    served = tmp_path / "served"
    (served / "data").mkdir(parents=True)
    (served / "data" / "a.txt").write_text("a")
    with tarfile.open(served / "data.tar.gz", "w:gz") as tar:
        tar.add(served / "data", arcname="data")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = tmp_path / "root"
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/data.tar.gz"
        download_archive(url, root)
    finally:
        server.shutdown()
        server.server_close()
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == [
        "data", "data.tar.gz", "data/a.txt"
    ]  # fmt: skip
    assert (root / "data" / "a.txt").read_text() == "a"


def test_trials_starting_together_download_once_and_all_find_the_whole_data(
    tmp_path: Path,
) -> None:
    """Four trials on one node ask for the same missing dataset at once: one downloads and
    unpacks it, the others wait and find all of it (the server is asked once)."""
    import functools
    import tarfile

    served = tmp_path / "served"
    (served / "data").mkdir(parents=True)
    for i in range(40):
        (served / "data" / f"{i}.txt").write_text(str(i) * 10_000)
    with tarfile.open(served / "data.tar.gz", "w:gz") as tar:
        tar.add(served / "data", arcname="data")
    gets: list[str] = []

    class Counting(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            gets.append(self.path)
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Counting, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = tmp_path / "root"
    url = f"http://127.0.0.1:{server.server_address[1]}/data.tar.gz"
    errors: list[BaseException] = []

    def trial() -> None:
        try:
            fetch_once(
                "data", root / "data", url, root, "data/", lambda: download_archive(url, root)
            )
            assert len(list((root / "data").iterdir())) == 40  # whole when it returns
        except BaseException as error:  # collected for the main thread
            errors.append(error)

    try:
        threads = [threading.Thread(target=trial) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert errors == []
    assert gets == ["/data.tar.gz"] * 2  # one download: torchvision GETs for redirects first
    assert sorted(p.name for p in root.iterdir()) == [".data.download.lock", "data", "data.tar.gz"]


def test_a_higgs_file_cut_short_by_a_full_disk_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Saving the fetched arrays fails part way: no file is left that the next run would
    open as the dataset (it would fail on a broken archive instead of downloading again)."""
    import errno
    import os
    from types import SimpleNamespace

    data = SimpleNamespace(data=np.zeros((4, 24)), target=np.array(["a", "b", "a", "b"]))
    monkeypatch.setattr("sklearn.datasets.fetch_openml", lambda **kwargs: data)

    def disk_full(path: Path, **arrays: object) -> None:
        Path(path).write_bytes(b"PK\x03\x04 cut")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("numpy.savez", disk_full)
    with pytest.raises(DatasetUnavailableError, match=r"No space left on device"):
        load_dataset("higgs", DataConfig(root=tmp_path, download=True))
    assert not (tmp_path / "higgs" / "higgs.npz").exists()
