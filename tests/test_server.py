"""`cbir serve` over HTTP: a real server process on 127.0.0.1, real photos, real requests."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import TESTDATA, needs_shared
from tests.serving import Server, multipart
from tests.test_cli import run_cli

pytestmark = needs_shared
NEAR = TESTDATA / "near_duplicates"


def fingerprint(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under `folder`: (size, mtime_ns, sha256)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            info = path.stat()
            found[str(path.relative_to(folder))] = (
                info.st_size, info.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return found


@pytest.fixture(scope="module")
def served(photos_db: Path, tmp_path_factory: pytest.TempPathFactory):
    db = tmp_path_factory.mktemp("served") / "photos.db"
    shutil.copytree(photos_db, db)
    before = fingerprint(db)
    server = Server(db)
    server.db, server.before = db, before
    yield server
    server.stop()


def test_it_says_where_it_serves_once_ready(served: Server) -> None:
    assert served.ready_line == f"serving {served.db} at http://127.0.0.1:{served.port}/"
    status, _, page = served.request("GET", "/")
    assert status == 200 and b'<input id="file" type="file"' in page
    status, schema = served.get("/openapi.json")
    assert status == 200 and "/api/query" in schema["paths"]


@pytest.mark.parametrize("variant", ["chelsea__rot5", "astronaut__crop90", "coffee__bright130",
                                     "china__hflip"])  # fmt: skip
def test_an_uploaded_near_duplicate_finds_its_original_first(served: Server, variant: str) -> None:
    status, result = served.upload("/api/query?n=5", (NEAR / f"{variant}.jpg").read_bytes(),
                                   name=f"{variant}.jpg")  # fmt: skip
    assert status == 200, result
    assert result["query"] == f"{variant}.jpg"
    best = result["results"][0]
    assert Path(best["path"]).stem == variant.split("__")[0]
    assert best["thumbnail"] == f"/api/thumbnails/{best['id']}"
    assert len(result["results"]) == 5


def test_an_upload_answers_what_cbir_query_json_prints(served: Server) -> None:
    query = NEAR / "astronaut__q30.jpg"
    status, served_result = served.upload("/api/query", query.read_bytes(), n="7")
    cli = json.loads(run_cli("query", str(served.db), str(query), "-n", "7", "--json").stdout)
    assert status == 200
    for hit in served_result["results"]:
        assert hit.pop("thumbnail") == f"/api/thumbnails/{hit['id']}"
        assert hit.pop("image") == f"/api/images/{hit['id']}"
    cli_scores = [h.pop("score") for h in cli["results"]]
    served_scores = [h.pop("score") for h in served_result["results"]]
    assert served_scores == pytest.approx(cli_scores, abs=1e-4)
    del cli["query"], served_result["query"]
    for mine, theirs in zip(served_result["categories"], cli["categories"], strict=True):
        assert mine.pop("prob") == pytest.approx(theirs.pop("prob"), abs=1e-4)
    assert served_result == cli


def test_results_link_to_their_thumbnail_and_their_stored_file(served: Server) -> None:
    _, result = served.upload("/api/query?n=3", (NEAR / "chelsea__grey.jpg").read_bytes())
    best = result["results"][0]
    status, headers, thumb = served.request("GET", best["thumbnail"])
    assert status == 200 and headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumb)) as im:
        assert max(im.size) == 256 and im.format == "JPEG"
    status, headers, full = served.request("GET", best["image"])
    stored = [p for p in served.db.rglob("chelsea-*.jpg")]
    assert status == 200 and headers["content-type"] == "image/jpeg"
    assert full == stored[0].read_bytes() == Path(best["path"]).read_bytes()


def test_more_like_this_leaves_the_image_itself_out(served: Server) -> None:
    _, result = served.upload("/api/query?n=1", (NEAR / "chelsea__half.jpg").read_bytes())
    chelsea = result["results"][0]["id"]
    status, like = served.get(f"/api/query?id={chelsea}&n=10")
    assert status == 200
    ids = [h["id"] for h in like["results"]]
    assert len(ids) == 10 and chelsea not in ids
    assert Path(like["query"]).name == "chelsea.jpg"
    assert served.get("/api/query?id=12345")[0] == 404
    assert served.get("/api/query?id=nope")[0] == 404


def test_info_is_cbir_info_json(served: Server) -> None:
    status, info = served.get("/api/info")
    assert status == 200
    assert info == json.loads(run_cli("info", str(served.db), "--json").stdout)


def test_categories_largest_first_and_pages_cover_each_once(served: Server) -> None:
    status, listing = served.get("/api/categories")
    assert status == 200 and listing["images"] == 37
    sizes = [c["images"] for c in listing["categories"]]
    assert sizes == sorted(sizes, reverse=True)
    largest = listing["categories"][0]
    seen = []
    for offset in range(0, largest["images"], 3):
        status, page = served.get(f"/api/categories/{largest['id']}?offset={offset}&limit=3")
        assert status == 200 and page["total"] == largest["images"]
        seen += [im["id"] for im in page["images"]]
    assert len(seen) == len(set(seen)) == largest["images"]
    assert served.get("/api/categories/n01440764")[0] == 404  # tench: none in the database
    assert served.get("/api/categories/..%2F..%2Fetc")[0] == 404
    assert served.get(f"/api/categories/{largest['id']}?limit=100000")[0] == 400


@pytest.mark.parametrize("path", [
    "/api/images/../../etc/passwd",
    "/api/images/..%2F..%2F..%2Fetc%2Fpasswd",
    "/api/images/%2e%2e/%2e%2e/etc/passwd",
    "/api/images/%252e%252e%252fetc%252fpasswd",
    "/api/thumbnails/..%2f..%2fcatalog.sqlite",
    "/api/images//etc/passwd",
    "/api/images/catalog.sqlite",
    "/api/images/12345",  # a well-formed id the catalog does not list
    "/api/images/99999999999999999999999",
    "/api/images/%EF%BC%91%EF%BC%92",  # full-width digits
    "/api/thumbnails/-0x10",
    "/../../etc/passwd",
])  # fmt: skip
def test_traversal_and_unknown_ids_are_404(served: Server, path: str) -> None:
    status, _, body = served.request("GET", path)
    assert status == 404, body
    assert b"root:" not in body and b"SQLite" not in body


def test_an_oversized_upload_is_413_whether_or_not_it_says_its_length(served: Server) -> None:
    big = os.urandom(21 * 1024 * 1024)
    body, content_type = multipart(big, "big.jpg", {})
    status, _, reply = served.request("POST", "/api/query", body, {"Content-Type": content_type})
    assert status == 413 and b"20 MB" in reply
    chunked = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    status, _, reply = served.request("POST", "/api/query", chunked, {
        "Content-Type": content_type, "Transfer-Encoding": "chunked"})
    assert status == 413


@pytest.mark.parametrize("name, reason", [
    ("not_an_image.jpg", "not an image"),
    ("empty.jpg", "empty file"),
    ("truncated.jpg", "cannot decode"),
    ("bomb.png", "bomb"),
    ("document_pdf.jpg", "not an image"),
])  # fmt: skip
def test_a_bad_upload_is_400_with_the_reason(served: Server, name: str, reason: str) -> None:
    status, reply = served.upload("/api/query", (TESTDATA / "bad" / name).read_bytes(), name)
    assert status == 400 and reason in reply["detail"], reply


def test_another_host_name_is_refused(served: Server) -> None:
    """A page whose name was re-pointed at 127.0.0.1 (DNS rebinding) cannot read the API."""
    status, _, body = served.request("GET", "/api/info", headers={"Host": "evil.example"})
    assert status == 400 and b"photos.db" not in body
    assert served.request("GET", "/api/info", headers={"Host": "localhost"})[0] == 200


def test_malformed_requests_are_400(served: Server) -> None:
    photo = (NEAR / "coffee__q30.jpg").read_bytes()
    assert served.upload("/api/query", photo, n="\u00b2")[0] == 400  # a digit, not ASCII
    assert served.upload("/api/query?n=0", photo)[0] == 400
    assert served.upload("/api/query", photo, n="many")[0] == 400
    status, _, _ = served.request("POST", "/api/query", photo, {"Content-Type": "image/jpeg"})
    assert status == 400
    body, content_type = multipart(photo, "x.jpg", {})
    body = body.replace(b'name="image"', b'name="picture"')
    status, _, reply = served.request("POST", "/api/query", body, {"Content-Type": content_type})
    assert status == 400 and b"'image'" in reply


def test_the_server_never_writes_the_database(served: Server) -> None:
    """Last in this file: after every request above, the database is byte for byte as it was."""
    assert fingerprint(served.db) == served.before
    assert not [line for line in served.stderr if "Traceback" in line], served.stderr


def test_a_stored_copy_replaced_by_a_link_is_not_followed(photos_db: Path, tmp_path: Path) -> None:
    db = tmp_path / "photos.db"
    shutil.copytree(photos_db, db)
    copies = sorted(db.glob("*/chelsea-*.jpg"))
    for copy in copies:  # every category's copy now points at a system file
        copy.unlink()
        copy.symlink_to("/etc/passwd")
    server = Server(db)
    try:
        _, result = server.upload("/api/query?n=1", (NEAR / "chelsea__rot5.jpg").read_bytes())
        chelsea = result["results"][0]
        assert Path(chelsea["path"]).name == "chelsea.jpg"  # found by its feature, as before
        for url in (chelsea["image"], chelsea["thumbnail"]):
            status, _, body = server.request("GET", url)
            assert status == 404 and b"root:" not in body
    finally:
        server.stop()


def test_a_running_server_ranks_with_a_head_trained_beside_it_and_without_after_reset(
    photos_db: Path, tmp_path: Path
) -> None:
    db = tmp_path / "photos.db"
    shutil.copytree(photos_db, db)
    queries = [NEAR / "astronaut__q30.jpg", NEAR / "chelsea__rot5.jpg", NEAR / "coffee__crop90.jpg"]
    server = Server(db)
    try:
        def answers() -> list[dict]:
            found = []
            for query in queries:
                status, result = server.upload("/api/query", query.read_bytes(), n="20")
                assert status == 200
                found.append([(h["id"], round(h["score"], 4)) for h in result["results"]])
            return found

        plain = answers()
        assert run_cli("train", str(db), str(TESTDATA / "photos")).returncode == 0  # all held
        status, info = server.get("/api/info")
        assert status == 200 and info["query_head"]["images"] == 37
        trained = answers()
        for query, served in zip(queries, trained, strict=True):
            cli = json.loads(run_cli("query", str(db), str(query), "-n", "20", "--json").stdout)
            assert [h["id"] for h in cli["results"]] == [i for i, _ in served]
        assert trained != plain
        assert run_cli("train", str(db), "--reset").returncode == 0
        assert answers() == plain
    finally:
        server.stop()
