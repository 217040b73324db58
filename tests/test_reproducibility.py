"""Reproducible explanations: the same bits whatever the batch, a provenance record, and verification.

Engine and service level, on the real EfficientNet-Lite0 with real photos; the same checks through a real
TorchServe under concurrent load are in tests/serving/test_reproducible_serving.py.
"""

import hashlib
import base64
import json

import numpy as np
import pytest
import torch

from handler import ExplanationService
from handler.cli import run as cli_run
from handler.models import file_sha256, get_spec, weights_path
from handler.provenance import attribution_sha256

BUDGET_BYTES = 150_000  # the default response's size budget (tests/serving/test_server.py)


@pytest.fixture(scope="module")
def images(lite0_service, photos):
    """Each sample photo preprocessed, by name, and its bytes."""
    data = {name: path.read_bytes() for name, path in photos.items()}
    decoded = {name: lite0_service.decode(raw) for name, raw in data.items()}
    return {name: lite0_service.preprocessor.batch([image]) for name, image in decoded.items()}, data


def digests(service, tensors, names):
    explainer = service.explainer
    request = explainer.validate(explainer.defaults)
    batch = torch.cat([tensors[name] for name in names])
    return [attribution_sha256(e.attribution) for e in explainer.explain_requests(batch, [request] * len(names))]


@pytest.fixture(scope="module")
def lite0_passes_of_4():
    return ExplanationService.from_spec("efficientnet_lite0", device="cpu", pass_batch=4)


def test_the_default_pass_shape_is_one_sample_on_the_cpu_and_four_on_a_gpu(lite0_service):
    from handler.engine import resolve_pass_batch

    assert lite0_service.explainer.pass_batch == 1  # "auto" on the CPU: a lone request pays no padding
    assert resolve_pass_batch("auto", "cpu") == 1 and resolve_pass_batch("auto", "cuda") == 4
    assert resolve_pass_batch(3, "cpu") == 3 and resolve_pass_batch(None, "cpu") is None
    for bad in (0, -1, 2.5, True, "four"):
        with pytest.raises(ValueError, match="pass_batch"):
            resolve_pass_batch(bad, "cpu")


@pytest.mark.parametrize("shape", [1, 4])
def test_an_image_gets_the_same_attribution_bits_alone_and_in_any_batch_position(
        shape, lite0_service, lite0_passes_of_4, images):
    tensors, _ = images
    service = lite0_service if shape == 1 else lite0_passes_of_4
    assert service.explainer.pass_batch == shape
    [alone] = digests(service, tensors, ["coffee"])
    batches = [["chelsea", "coffee"], ["coffee", "astronaut", "rocket"], ["rocket", "chelsea", "astronaut", "coffee"],
               ["astronaut", "chelsea", "rocket", "chelsea", "coffee"]]  # 5: cut into a pass of 4 and a padded one
    for names in batches:
        found = digests(service, tensors, names)
        assert found[names.index("coffee")] == alone, names
    # and a neighbour's bits do not depend on coffee either
    assert digests(service, tensors, ["chelsea", "coffee"])[0] == digests(service, tensors, ["chelsea"])[0]


def test_an_out_of_memory_split_keeps_results_verifiable_at_the_recorded_shape(lite0_service, images, monkeypatch):
    """A pass of the fixed shape that runs out of memory is retried at half the shape; each explanation records
    the shape it ran at, and rerunning at that shape gives the same bits."""
    from handler.engine.explainer import Explainer

    tensors, _ = images
    service = ExplanationService.from_spec("efficientnet_lite0", device="cpu", pass_batch=4)  # its own planner
    real_run = Explainer._run
    failed = []

    def run_or_fail(self, x, *args, **kwargs):
        if x.shape[0] == 4 and not failed:
            failed.append(True)
            raise torch.OutOfMemoryError("simulated")
        return real_run(self, x, *args, **kwargs)

    monkeypatch.setattr(Explainer, "_run", run_or_fail)
    explainer = service.explainer
    request = explainer.validate(explainer.defaults)
    batch = torch.cat([tensors[n] for n in ("chelsea", "coffee", "rocket")])
    split = explainer.explain_requests(batch, [request] * 3)
    assert failed and [e.pass_batch for e in split] == [2, 2, 2]
    monkeypatch.setattr(Explainer, "_run", real_run)
    [again] = explainer.explain_requests(tensors["coffee"], [request], pass_batch=2)
    assert attribution_sha256(again.attribution) == attribution_sha256(split[1].attribution)


def test_every_explanation_document_records_its_provenance(lite0_service, coffee):
    [result] = lite0_service.explain_images([coffee], sparsity=0.6)
    record = result.document["provenance"]
    assert record["model"] == "efficientnet_lite0"
    assert record["weights_sha256"] == file_sha256(weights_path(get_spec("efficientnet_lite0")))
    assert record["image_sha256"] == hashlib.sha256(coffee).hexdigest()
    assert record["attribution_sha256"] == hashlib.sha256(result.attribution.astype("<f4").tobytes()).hexdigest()
    assert record["options"]["sparsity"] == 0.6 and record["options"]["method"] == "pathway_gradient"
    assert record["options"]["reduce"] == "max_abs" and record["options"]["selection"] == "contribution"
    assert record["options"]["top_k"] == 5 and "method_options" in record["options"]
    assert record["preprocessing"]["crop"] == 224 and record["device"] == "cpu"
    assert record["torch"] == torch.__version__ and record["pass_batch"] == 1  # "auto" on the CPU
    # what explanations ran on
    assert record["preparation"] == "49 BatchNorm(s) folded, 5 same padding(s) folded, channels_last"
    assert record["package"].startswith("pathway-explainer ") and record["revision"]
    # the server's default response (heatmap + pathway, inline) stays within its budget with the record
    [served] = lite0_service.explain([lite0_service.decode(coffee)], [result_options(lite0_service)])
    assert len(json.dumps(served.inline()).encode()) < BUDGET_BYTES


def result_options(service):
    from handler.schema import parse_options

    return parse_options({}, service.limits)


def test_verify_accepts_the_document_for_its_image_and_names_what_differs_otherwise(lite0_service, coffee, chelsea):
    [result] = lite0_service.explain_images([coffee])
    document = json.loads(json.dumps(result.inline()))  # as a client stores it
    verified = lite0_service.verify(document, coffee)
    assert verified.ok, verified.message
    assert verified.attribution_sha256 == document["provenance"]["attribution_sha256"]

    other = lite0_service.verify(document, chelsea)
    assert not other.ok and other.differences[0] == "image" and "attribution" in other.differences

    resparsed = json.loads(json.dumps(document))
    resparsed["provenance"]["options"]["sparsity"] = 0.5  # claims another sparsity: the bits differ
    resparsed["explanation"]["pathway"]["requested_sparsity"] = 0.5
    assert lite0_service.verify(resparsed, coffee).differences == ("attribution",)

    inconsistent = json.loads(json.dumps(document))
    inconsistent["explanation"]["pathway"]["requested_sparsity"] = 0.5  # the record says 0.7
    refused = lite0_service.verify(inconsistent, coffee)
    assert refused.differences == ("options",) and "sparsity" in refused.message

    assert lite0_service.verify({"model": "x"}, coffee).differences == ("document",)


def test_verify_accepts_a_signed_contribution_pathway_whose_summary_names_the_signed_selection(lite0_service, coffee):
    [result] = lite0_service.explain_images([coffee], signed="true", sparsity=0.9, target="tabby")
    document = json.loads(json.dumps(result.inline()))
    assert document["explanation"]["pathway"]["selection"] == "contribution_signed"
    assert lite0_service.verify(document, coffee).ok
    document["explanation"]["pathway"]["selection"] = "random"
    assert lite0_service.verify(document, coffee).differences == ("content",)


def _flip_base64(output: dict, at: float = 1.0) -> None:
    """Flip one bit of an inline output, at a fraction ``at`` of its length (1: its last byte)."""
    raw = bytearray(base64.b64decode(output["data"]))
    raw[min(len(raw) - 1, int(len(raw) * at))] ^= 1
    output["data"] = base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize("tamper, where", [
    (lambda d: d["predictions"][0].update(label="cup", probability=0.01), "predictions[0].label ('cup' instead of"),
    (lambda d: d["explanation"]["pathway"].update(kept_neurons=1), "explanation.pathway.kept_neurons (1 instead of"),
    (lambda d: d["explanation"]["target"].update(probability=0.5), "explanation.target.probability (0.5 instead"),
    (lambda d: d["explanation"]["notes"].append("looks fine"), "explanation.notes (["),
    (lambda d: _flip_base64(d["explanation"]["attribution"]), "explanation.attribution (its application/x-npy)"),
    (lambda d: _flip_base64(d["explanation"]["overlay"], 0.5), "explanation.overlay (its image/png)"),
    (lambda d: d["explanation"].pop("heatmap"), "explanation.heatmap (missing)"),
])
def test_verify_checks_what_the_document_shows_not_only_its_record(lite0_service, coffee, tamper, where):
    """The digest proves the recorded attribution; a document whose predictions, pathway summary or outputs were
    changed after the fact must not verify because its record still holds."""
    [result] = lite0_service.explain_images([coffee], outputs="heatmap,overlay,attribution,pathway")
    document = json.loads(json.dumps(result.inline()))
    assert lite0_service.verify(document, coffee).ok
    tamper(document)
    verified = lite0_service.verify(document, coffee)
    assert not verified.ok and verified.differences == ("content",), verified.message
    assert where in verified.message, verified.message


@pytest.mark.parametrize("asked", [{"explain_top_k": 2}, {"targets": [968, "espresso"]}])
def test_verify_recomputes_every_target_of_a_several_targets_document_and_names_the_one_that_differs(
        lite0_service, coffee, asked):
    [result] = lite0_service.explain_images([coffee], **asked)
    document = json.loads(json.dumps(result.inline()))
    recorded = document["provenance"]["attribution_sha256"]
    assert len(recorded) == len(document["explanations"]) == 2
    verified = lite0_service.verify(document, coffee)
    assert verified.ok, verified.message
    assert verified.attribution_sha256 == recorded and "2 attributions" in verified.message

    tampered = json.loads(json.dumps(document))
    tampered["provenance"]["attribution_sha256"][1] = "0" * 64
    refused = lite0_service.verify(tampered, coffee)
    assert refused.differences == ("attribution",) and "attribution 2 of 2" in refused.message, refused.message

    retargeted = json.loads(json.dumps(document))
    retargeted["explanations"][0]["target"]["index"] = 7
    refused = lite0_service.verify(retargeted, coffee)
    assert refused.differences == ("target",) and "target 1 of 2" in refused.message, refused.message

    unpaired = json.loads(json.dumps(document))
    unpaired["provenance"]["attribution_sha256"] = recorded[:1]
    assert lite0_service.verify(unpaired, coffee).differences == ("document",)

    single = json.loads(json.dumps(document))  # one explanation cut out, with the list options still recorded
    single["explanation"] = single.pop("explanations")[0]
    single["provenance"]["attribution_sha256"] = recorded[0]
    refused = lite0_service.verify(single, coffee)
    assert "target" in refused.differences and "ask for a list" in refused.message, refused.message

    assert not lite0_service.verify(document, coffee[:-1] + b"x").ok  # another image: the digests differ too


def test_verify_names_a_different_model_preparation(lite0_service, coffee):
    """The preparation changes an explanation's bits: a document made on the prepared model is not verified by
    the model as trained, and verify says why."""
    from handler.models import load_model

    [result] = lite0_service.explain_images([coffee])
    document = json.loads(json.dumps(result.inline()))
    as_trained = ExplanationService(load_model("efficientnet_lite0", prepare=False))
    assert as_trained.preparation == "none"
    refused = as_trained.verify(document, coffee)
    assert not refused.ok and refused.differences[0] == "preparation", refused.message
    assert "49 BatchNorm(s) folded, 5 same padding(s) folded, channels_last" in refused.message


def test_cli_verify_refuses_tampered_weights(lite0_service, coffee, photos, tmp_path, capsys):
    """Weights with one value changed: --verify names the weights (exit 1); the real weights pass (exit 0)."""
    [result] = lite0_service.explain_images([coffee])
    doc = tmp_path / "coffee.json"
    doc.write_text(json.dumps(result.inline()))
    spec = get_spec("efficientnet_lite0")
    state = torch.load(weights_path(spec), map_location="cpu", weights_only=True)
    first = next(iter(state))
    state[first] = state[first].clone(memory_format=torch.contiguous_format)
    state[first].view(-1)[0] += 1e-3
    torch.save(state, tmp_path / "tampered.pth")
    data = spec.to_dict()
    data["weights"] = {"file": str(tmp_path / "tampered.pth"), "match": "order"}
    (tmp_path / "tampered.json").write_text(json.dumps(data))

    assert cli_run(["--verify", str(doc), str(photos["coffee"]), "--device", "cpu"]) == 0
    assert "verified" in capsys.readouterr().out
    assert cli_run(["--verify", str(doc), str(photos["coffee"]), "--device", "cpu",
                    "--model", str(tmp_path / "tampered.json")]) == 1
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "differs (weights" in message


def test_verify_accepts_a_document_made_with_visualisation_settings(lite0_service, coffee):
    """The record holds every resolved option, visualisation settings included, in a form the parser takes back."""
    [result] = lite0_service.explain_images([coffee], polarity="both", clip_percent_upper=99.0, smooth=0)
    document = json.loads(json.dumps(result.inline()))
    options = document["provenance"]["options"]
    assert options["polarity"] == "both" and options["clip_percent_upper"] == 99.0 and options["smooth"] == 0
    verified = lite0_service.verify(document, coffee)
    assert verified.ok, verified.message


def test_random_weights_are_identified_by_their_state_dict_including_zero_dim_buffers():
    """A spec without a weights file is hashed from its state dict; BatchNorm's step counter is a 0-d tensor."""
    from torch import nn

    from handler.provenance import state_dict_sha256

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    same = state_dict_sha256(model)
    assert same == state_dict_sha256(model) and len(same) == 64
    with torch.no_grad():
        model[1].num_batches_tracked += 1
    assert state_dict_sha256(model) != same


def test_verify_recomputes_with_the_recorded_thread_count(lite0_service, coffee):
    """A CPU kernel splits its reductions by thread, so the bits depend on the thread count (a server worker runs
    with its own, model-config.yaml's torch_threads): the record names it and verify recomputes with it."""
    from handler.service import cpu_threads

    before = torch.get_num_threads()
    with cpu_threads(1):
        [result] = lite0_service.explain_images([coffee])
    document = json.loads(json.dumps(result.inline()))
    assert document["provenance"]["torch_threads"] == 1
    verified = lite0_service.verify(document, coffee)
    assert verified.ok and "on 1 thread(s)" in verified.message, verified.message
    assert torch.get_num_threads() == before  # verify leaves the caller's threads as they were


@pytest.mark.parametrize("field, value", [("torch_threads", 0), ("torch_threads", True), ("pass_batch", "4"),
                                          ("pass_batch", -2)])
def test_verify_names_a_recorded_thread_count_or_pass_shape_that_is_not_a_positive_integer(
        lite0_service, coffee, field, value):
    [result] = lite0_service.explain_images([coffee])
    document = json.loads(json.dumps(result.inline()))
    document["provenance"][field] = value
    verified = lite0_service.verify(document, coffee)
    assert not verified.ok
    assert f"the recorded {field} {value!r} is not a positive integer" in verified.message, verified.message
