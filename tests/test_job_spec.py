"""The job spec: what the API stores is what the worker reads back, and what the API refuses the
worker refuses too, naming the same field."""

from __future__ import annotations

import pytest

from app.job_spec import InvalidSpec, JobCreate, read_spec
from tests.instances import safeedit_instance


def test_a_stored_dinm_spec_reads_back_as_the_validated_request():
    request = JobCreate.model_validate(
        {"kind": "dinm", "instance": safeedit_instance(), "params": {"preset": "paper", "steps": 3}}
    ).root
    stored = request.spec()
    assert read_spec("dinm", stored) == request
    assert read_spec("dinm", {k: v for k, v in stored.items() if k != "kind"}) == request


def test_a_stored_unlearn_spec_keeps_its_resolved_corpus_ids():
    request = JobCreate.model_validate({"kind": "unlearn", "corpus_id": "hate"}).root
    stored = request.spec(corpus_id="5d6f0f67-0000-4000-8000-000000000000", retain_corpus_id=None)
    spec = read_spec("unlearn", stored)
    assert spec.corpus_id == "5d6f0f67-0000-4000-8000-000000000000"
    assert spec.params == request.params


@pytest.mark.parametrize(
    ("kind", "spec", "code", "param"),
    [
        ("retrain", {}, "unsupported_kind", "kind"),
        ("dinm", ["not", "an", "object"], "invalid_spec", None),
        ("dinm", {"kind": "eval"}, "invalid_spec", "kind"),
        ("dinm", {"instance": safeedit_instance(), "params": {"lr": 5}}, "invalid_params",
         "params.lr"),
        ("dinm", {"instance": safeedit_instance(), "name": "base"}, "invalid_version_name", "name"),
        ("dinm", {}, "invalid_instance", "instance"),
        ("dinm", {"instance": safeedit_instance(), "instances": [safeedit_instance()]},
         "invalid_instance", "instances"),
        ("dinm", {"instances": [safeedit_instance(), safeedit_instance(without=["question"],
         safe_generation=7)]}, "invalid_instance", "instances[1].safe generation"),
        ("eval", {"suites": ["bias", "bias"]}, "invalid_suites", "suites"),
        ("unlearn", {"forget": ["x"], "retain": ["y"], "retain_corpus_id": "c"},
         "invalid_retain", "retain_corpus_id"),
    ],
)  # fmt: skip
def test_a_spec_the_api_refuses_is_refused_with_the_field(kind, spec, code, param):
    with pytest.raises(InvalidSpec) as caught:
        read_spec(kind, spec)
    assert (caught.value.code, caught.value.param) == (code, param)
    if param is not None:
        assert caught.value.message.startswith(f"{param}: ")


def test_a_spec_of_several_instances_stores_them_all_and_reads_back():
    instances = [safeedit_instance(), safeedit_instance(id="t2")]
    request = JobCreate.model_validate({"kind": "dinm", "instances": instances}).root
    stored = request.spec()
    assert "instance" not in stored and [i["id"] for i in stored["instances"]] == ["t1", "t2"]
    assert read_spec("dinm", stored) == request
    assert [i.id for i in request.all_instances()] == ["t1", "t2"]
    single = JobCreate.model_validate({"kind": "dinm", "instance": instances[0]}).root
    assert "instances" not in single.spec() and single.all_instances()[0].id == "t1"
