"""``lull bench-kv``'s command line: parsing and validation, without starting an engine."""

from __future__ import annotations

import pytest

from controller.cli import build_parser, main
from controller.cli.bench.kv import MOVES, TIERS, BenchSettings, render, write_report
from workers.tiny_model import TinyModelSpec


def parse(*argv: str):
    return build_parser().parse_args(["bench-kv", *argv])


def test_defaults_and_context_list_are_parsed_sorted():
    args = parse()
    assert args.context == (256, 1024, 4096) and args.repeats == 5 and args.json is None
    assert parse("--context", "1024, 64").context == (64, 1024)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", "'abc' is not a whole number of tokens"),
        ("256,", "'' is not a whole number of tokens"),
        ("32", "context 32 is below the minimum of 64 tokens"),
        ("-5", "context -5 is below the minimum"),
        ("256,256", "context sizes repeat"),
    ],
)
def test_bad_context_is_a_usage_error_naming_the_value(value, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse("--context", value)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --context" in err and message in err


def test_settings_that_cannot_run_fail_before_anything_starts(capsys):
    positions = TinyModelSpec().max_position_embeddings
    assert main(["bench-kv", "--context", str(positions - 2)]) == 2  # + 4 output tokens
    assert f"exceeds the model's {positions} positions" in capsys.readouterr().err
    assert main(["bench-kv", "--max-tokens", "40"]) == 2
    assert "max_tokens must be in 1..16" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least one context"):
        BenchSettings(contexts=())


def test_report_writes_markdown_and_png(tmp_path):
    figures = {
        "ttft_s": {t: 0.01 * (i + 1) for i, t in enumerate(TIERS)},
        "moves": {m: {"seconds": 0.001, "bytes": 65536, "bytes_per_s": 65536e3, "samples": 1} for m in MOVES},
    }
    result = {
        "note": "the GPU tier here is host memory",
        "machine": {"cpu": "test cpu", "cpus_usable": 2, "memory_bytes": 8 << 30, "vllm": "x", "torch": "y"},
        "settings": {"repeats": 1, "dtype": "float32", "max_tokens": 4,
                     "model": {"name": "tiny", "num_layers": 2, "num_kv_heads": 2}},
        "contexts": {"64": figures, "256": figures},
    }
    md, png = write_report(tmp_path / "report", result)
    text = md.read_text()
    assert "| 64 | 10.0 | 20.0 | 30.0 | 40.0 |" in text and "dram -> shared" in text and png.name in text
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert [t.row_count for t in render(result)] == [2, 2 * len(MOVES)]
