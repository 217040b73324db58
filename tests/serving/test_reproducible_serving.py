"""Reproducible explanations through a real TorchServe: under concurrent load, with varying neighbours in
TorchServe's batches, every answer's attribution digest equals the same photo's answer sent alone, and
``pathway-explain --verify`` accepts the server's document for its photo and refuses it for another, also a
document with several targets."""

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from handler.cli import run as cli_run

pytestmark = pytest.mark.server
MODEL = "efficientnet_lite0"
NAMES = ("coffee", "chelsea", "astronaut", "rocket")


def explain(server, data: bytes) -> dict:
    reply = server.post(f"/explanations/{MODEL}", json={"image": base64.b64encode(data).decode()})
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_concurrent_answers_have_the_bits_of_the_photo_sent_alone_and_verify(server, photos, tmp_path, capsys):
    data = {name: photos[name].read_bytes() for name in NAMES}
    alone = {name: explain(server, data[name]) for name in NAMES}
    before = server.logged_batches()
    # the same photos in varying combinations and orders, sent together so TorchServe batches them
    rounds = [["coffee", "chelsea", "astronaut", "coffee", "rocket", "chelsea"],
              ["rocket", "coffee", "coffee", "astronaut", "chelsea", "rocket", "coffee"]]
    for names in rounds:
        with ThreadPoolExecutor(len(names)) as pool:
            answers = list(pool.map(lambda name: explain(server, data[name]), names))
        for name, answer in zip(names, answers):
            assert answer["provenance"]["attribution_sha256"] == alone[name]["provenance"]["attribution_sha256"], name
            assert answer["explanation"]["heatmap"]["data"] == alone[name]["explanation"]["heatmap"]["data"], name
    sizes = server.batch_sizes(skip=before, requests=sum(len(names) for names in rounds))
    assert max(sizes) > 1, "the concurrent requests were never batched together"

    document = tmp_path / "coffee.json"
    document.write_text(json.dumps(alone["coffee"]))
    assert cli_run(["--verify", str(document), str(photos["coffee"]), "--device", "cpu"]) == 0
    assert "pass shape 1 on " in capsys.readouterr().out  # "auto" on the CPU, at the worker's threads
    assert cli_run(["--verify", str(document), str(photos["chelsea"]), "--device", "cpu"]) == 1
    assert "differs (image" in capsys.readouterr().err


def test_verify_accepts_a_served_document_with_several_targets(server, photos, tmp_path, capsys):
    photo = base64.b64encode(photos["chelsea"].read_bytes()).decode()
    reply = server.post(f"/explanations/{MODEL}", json={"image": photo, "explain_top_k": 2})
    assert reply.status_code == 200, reply.text
    served = reply.json()
    assert len(served["explanations"]) == len(served["provenance"]["attribution_sha256"]) == 2
    document = tmp_path / "chelsea.json"
    document.write_text(json.dumps(served))
    assert cli_run(["--verify", str(document), str(photos["chelsea"]), "--device", "cpu"]) == 0
    assert "verified: 2 attributions" in capsys.readouterr().out
    assert cli_run(["--verify", str(document), str(photos["coffee"]), "--device", "cpu"]) == 1
    assert "differs (image" in capsys.readouterr().err
