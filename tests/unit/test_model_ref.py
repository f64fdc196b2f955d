"""proto/model_ref.py: the three forms of model.path, the errors that say which form was
meant, and the folder each maps to, which the chart mounts (tests/unit/test_helm_pods.py)."""

from __future__ import annotations

import pytest

from proto.model_ref import HF, LOCAL, PVC, ModelRef, local_model_dir, parse_model_ref


@pytest.mark.parametrize(("text", "ref", "folder"), [
    ("hf://Qwen/Qwen2.5-7B-Instruct", ModelRef(HF, "Qwen/Qwen2.5-7B-Instruct", revision="main"),
     "/models/hf/Qwen/Qwen2.5-7B-Instruct/main"),
    ("hf://meta-llama/Llama-3.1-70B-Instruct@0e9e39f", ModelRef(HF, "meta-llama/Llama-3.1-70B-Instruct", revision="0e9e39f"),
     "/models/hf/meta-llama/Llama-3.1-70B-Instruct/0e9e39f"),
    ("hf://gpt2", ModelRef(HF, "gpt2", revision="main"), "/models/hf/gpt2/main"),
    ("pvc://model-store", ModelRef(PVC, "model-store"), "/models/pvc/model-store"),
    ("pvc://model-store/llama/70b/", ModelRef(PVC, "model-store", subpath="llama/70b"),
     "/models/pvc/model-store/llama/70b"),
    ("/opt/models/tiny", ModelRef(LOCAL, "/opt/models/tiny"), "/opt/models/tiny"),
])
def test_each_form_parses_and_maps_to_the_folder_the_chart_mounts(text, ref, folder):
    assert parse_model_ref(text) == ref
    assert local_model_dir(text) == folder


def test_the_models_root_is_a_parameter():
    assert local_model_dir("hf://a/b@v1", models_root="/cache") == "/cache/hf/a/b/v1"
    assert local_model_dir("/abs/model", models_root="/cache") == "/abs/model"


@pytest.mark.parametrize(("text", "message"), [
    ("Qwen/Qwen2.5-7B-Instruct", r"\(a Hugging Face id\? write hf://Qwen/Qwen2\.5-7B-Instruct\)"),
    ("models/tiny", r"is not hf://ORG/NAME\[@REVISION\], pvc://CLAIM\[/PATH\] or an absolute local folder"),
    ("", r"a model reference must be"),
    ("hf://", r"is not hf://ORG/NAME\[@REVISION\]"),
    ("hf://a/b/c", r"is not hf://ORG/NAME\[@REVISION\]"),
    ("hf://a/b@", r"is not hf://ORG/NAME\[@REVISION\]"),
    ("hf://../etc", r"is not hf://ORG/NAME\[@REVISION\]"),
    ("pvc://Upper/x", r"CLAIM: a Kubernetes name, lowercase"),
    ("pvc://store/../../etc", r"must not climb out of it"),
    ("s3://bucket/model", r"unknown scheme"),
])
def test_what_is_refused_says_why(text, message):
    with pytest.raises(ValueError, match=message):
        parse_model_ref(text)
