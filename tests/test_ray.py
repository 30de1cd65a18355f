"""create-db --ray on a real Ray cluster of two nodes on this machine (`ray start --head` and a
second `ray start --address`), with a token of its own: a database built on it equals one
built locally, a killed actor's batch is retried, and Ray is never imported without --ray."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cbir.cli import main
from cbir.db import Database
from tests.conftest import TESTDATA, needs_shared

pytestmark = needs_shared


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """The address of a two-node Ray cluster (one CPU each), stopped afterwards."""
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():  # the test extra installs Ray: a missing one is a failure
        pytest.fail(f"Ray's 'ray' command is not at {ray_bin}: pip install '.[test]'")
    home = Path(tempfile.mkdtemp(prefix="cbir-ray-", dir="/tmp"))  # short: socket paths
    token = home / "token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus=1", "--disable-usage-stats"]
    starts = [
        [str(ray_bin), "start", "--head", f"--port={port}", "--include-dashboard=false",
         f"--temp-dir={home / 'tmp'}", *common],
        [str(ray_bin), "start", f"--address={address}",
         f"--dashboard-agent-listen-port={_free_port()}", *common],
    ]  # fmt: skip
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    try:
        for command in starts:
            subprocess.run(command, env=env, check=True, capture_output=True, timeout=180)
        os.environ.update({k: env[k] for k in saved})  # the in-process runs join with it
        yield address
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], env=env, capture_output=True,
                       timeout=120)  # fmt: skip
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(home, ignore_errors=True)


def _contents(db: Path) -> dict[str, tuple[tuple[str, ...], tuple[str, ...], np.ndarray]]:
    """sha256 -> (categories, source paths, stored feature) of every image."""
    out = {}
    with Database.open(db) as d:
        for record in d.images():
            feature = d.matrix().gather(np.array([record.row]))[0]
            out[record.sha256] = (record.wnids, tuple(sorted(d.paths_of(record.image_id))),
                                  feature)  # fmt: skip
    return out


def _assert_same(built: Path, expected: Path) -> None:
    ours, theirs = _contents(built), _contents(expected)
    assert ours.keys() == theirs.keys()
    for sha, (wnids, paths, feature) in ours.items():
        assert (wnids, paths) == theirs[sha][:2]
        np.testing.assert_allclose(feature, theirs[sha][2], atol=2e-2)  # bf16 tolerance


def test_a_database_built_on_two_ray_nodes_equals_one_built_locally(
    ray_cluster, photos_dir, photos_db, tmp_path, capsys
):
    db = tmp_path / "on_ray.db"
    assert main(["create-db", str(photos_dir), str(db), "--model", "efficientnet_lite0",
                 "--ray", ray_cluster]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "indexed 37" in err and "ray: 2 actor(s)" in err
    _assert_same(db, photos_db)
    assert main(["check", str(db)]) == 0


def test_shipped_bytes_give_the_same_database(ray_cluster, photos_dir, photos_db, tmp_path):
    db = tmp_path / "shipped.db"
    assert main(["create-db", str(photos_dir), str(db), "--model", "efficientnet_lite0",
                 "--ray", ray_cluster, "--ray-ship-bytes"]) == 0  # fmt: skip
    _assert_same(db, photos_db)


def _describing_actors() -> list[int]:
    """Pids of Ray actor processes in the middle of a describe call (Ray's process title)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            title = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if title.startswith(b"ray::Describer.describe"):
            pids.append(int(entry.name))
    return pids


def test_a_killed_actor_s_batch_is_retried_and_the_database_is_complete(
    ray_cluster, tmp_path
):
    source = tmp_path / "src"
    shutil.copytree(TESTDATA / "photos", source / "photos")
    shutil.copytree(TESTDATA / "near_duplicates", source / "near_duplicates")
    local = tmp_path / "local.db"
    assert main(["create-db", str(source), str(local), "--model", "efficientnet_lite0"]) == 0
    db = tmp_path / "killed.db"
    run = subprocess.Popen(
        [sys.executable, "-m", "cbir", "create-db", str(source), str(db), "--model",
         "efficientnet_lite0", "--ray", ray_cluster],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    killed_while_running = False
    deadline = time.monotonic() + 300
    while run.poll() is None and time.monotonic() < deadline:
        busy = _describing_actors()
        if busy:
            os.kill(busy[0], signal.SIGKILL)
            killed_while_running = run.poll() is None
            break
        time.sleep(0.02)
    _, err = run.communicate(timeout=300)
    assert killed_while_running, "no actor was seen describing while the run went on"
    assert run.returncode == 0, err
    assert "batch(es) retried after an actor died" in err
    _assert_same(db, local)


def test_ray_is_not_imported_without_the_option(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(TESTDATA / "photos" / "animals" / "chelsea.jpg", source)
    script = (
        "import sys\n"
        "from cbir.cli import main\n"
        f"assert main(['create-db', {str(source)!r}, {str(tmp_path / 'db')!r},"
        " '--model', 'efficientnet_lite0']) == 0\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'ray'], 'ray imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
