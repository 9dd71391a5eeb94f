"""``python -m hbmplan frontier``: table, JSON, plot, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hbmplan.capacity.frontier import Shards, frontier
from hbmplan.cli import main

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "frontier",
    "--preset",
    "llama3-8b",
    "--hbm",
    "80GiB",
    "--group",
    "16",
    "--response",
    "1024",
]


def test_table_lists_every_schedule_as_an_estimate(capsys):
    assert main([*ARGS, "--fsdp", "8"]) == 0
    out = capsys.readouterr().out
    assert "ESTIMATE" in out and "llama3-8b" in out and "fsdp=8" in out
    expected = frontier("llama3-8b", "80GiB", 16, 1024, shards=Shards(fsdp=8))
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    for name, f in expected.schedules.items():
        assert rows[name][1] == f"{f.max_prompt_len:,}"
        assert rows[name][2] == f"{f.total_tokens:,}"


def test_json_output_matches_the_library(capsys):
    assert main([*ARGS, "--fsdp", "8", "--schedules", "dense,reuse+offload", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = frontier("llama3-8b", "80GiB", 16, 1024, ("dense", "reuse+offload"),
                        shards=Shards(fsdp=8))  # fmt: skip
    assert out["estimate"] is True and set(out["schedules"]) == {"dense", "reuse+offload"}
    for name, f in expected.schedules.items():
        assert out["schedules"][name]["max_prompt_len"] == f.max_prompt_len
        assert out["schedules"][name]["peak_bytes"] == f.peak_bytes


def test_config_path_gives_the_same_numbers_as_the_preset(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, intermediate_size=14336, tie_word_embeddings=False,
    ).save_pretrained(tmp_path)  # fmt: skip
    assert main([*ARGS, "--json"]) == 0
    preset = json.loads(capsys.readouterr().out)["schedules"]
    args = [a if a != "--preset" else "--config" for a in ARGS]
    args[args.index("llama3-8b")] = str(tmp_path / "config.json")
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["schedules"] == preset


def test_plot_is_written(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="--plot needs the optional matplotlib extra")
    png = tmp_path / "frontier.png"
    assert main([*ARGS, "--fsdp", "8", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "plot written" in capsys.readouterr().out


def test_plot_without_matplotlib_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    assert main([*ARGS, "--plot", str(tmp_path / "f.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matplotlib" in err
    assert not (tmp_path / "f.png").exists()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["frontier", "--preset", "llama3-8b", "--hbm", "80XB", "--group", "1", "--response", "8"], "80XB"),
        (["frontier", "--preset", "gpt-5", "--hbm", "80GB", "--group", "1", "--response", "8"], "gpt-5"),
        (["frontier", "--preset", "qwen3-8b", "--hbm", "80GB", "--group", "0", "--response", "8"], "got 0"),
        (["frontier", "--preset", "qwen3-8b", "--hbm", "80GB", "--group", "x", "--response", "8"], "'x'"),
        (["frontier", "--hbm", "80GB", "--group", "1", "--response", "8"], "--preset"),
        (["frontier", "--preset", "qwen3-8b", "--config", "c.json", "--hbm", "1GB", "--group", "1",
          "--response", "8"], "not allowed"),
        (["frontier", "--config", "/nonexistent/config.json", "--hbm", "80GB", "--group", "1",
          "--response", "8"], "config.json"),
        (["frontier", "--preset", "qwen3-8b", "--hbm", "80GB", "--group", "1", "--response", "8",
          "--fsdp", "0"], "fsdp"),
        (["frontier", "--preset", "qwen3-8b", "--hbm", "80GB", "--group", "1", "--response", "8",
          "--schedules", "dense,magic"], "schedules"),
        (["nonsense"], "invalid choice"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_on_stderr_and_exit_code_2(argv, needle, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "error:" in captured.err and needle in captured.err


def test_python_dash_m_dispatches_to_the_cli():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    ok = subprocess.run([sys.executable, "-m", "hbmplan", *ARGS, "--optimizer", "none"],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "ESTIMATE" in ok.stdout and "reuse+offload" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "hbmplan", "frontier", "--hbm", "1GB"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
