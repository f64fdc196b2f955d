"""`EngineRequest`, the engine call both the gateway and the engine replica speak: checked where
it is built, carried by Ray as it is, and never printing its prompt."""

from __future__ import annotations

import pickle

import pytest

from proto.engine_request import EngineRequest


def test_a_request_keeps_its_fields_across_pickling_and_its_repr_leaves_the_prompt_out():
    request = EngineRequest([101, 102, 103], 4, 0.5, session_id="acme/s1", tenant="acme", tier="dram",
                            trace_headers={"traceparent": "00-ab-cd-01"})
    again = pickle.loads(pickle.dumps(request))
    assert again == request and again.request_id == request.request_id
    assert "101" not in repr(request) and "prompt_tokens=3" in repr(request)
    assert EngineRequest([1]).request_id != EngineRequest([1]).request_id


@pytest.mark.parametrize("fields, message", [
    (dict(prompt_token_ids=[]), "prompt_token_ids"),
    (dict(prompt_token_ids="1 2 3"), "prompt_token_ids"),
    (dict(prompt_token_ids=[1, -2]), "prompt_token_ids"),
    (dict(prompt_token_ids=[1, 2.0]), "prompt_token_ids"),
    (dict(prompt_token_ids=[1, True]), "prompt_token_ids"),
    (dict(prompt_token_ids=[1], max_tokens=0), "max_tokens"),
    (dict(prompt_token_ids=[1], temperature=3), "temperature"),
    (dict(prompt_token_ids=[1], tier="hbm"), "unknown tier 'hbm'"),
    (dict(prompt_token_ids=[1], session_id=""), "session_id"),
    (dict(prompt_token_ids=[1], trace_headers={"traceparent": 1}), "trace_headers"),
])
def test_bad_fields_are_refused_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        EngineRequest(**fields)


def test_a_request_is_frozen():
    with pytest.raises(AttributeError):
        EngineRequest([1]).max_tokens = 9
