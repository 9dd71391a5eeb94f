"""``python -m hbmplan frontier``: table, JSON, plot, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hbmplan import cli
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


def test_json_and_plot_keep_stdout_parseable(tmp_path, capsys, monkeypatch):
    # Issue 11: "plot written to ..." followed the JSON on stdout; messages go to stderr.
    pytest.importorskip("matplotlib", reason="--plot needs the optional matplotlib extra")
    monkeypatch.setattr(cli, "PLOT_POINTS", 6)  # fewer frontier calls; the same figure
    monkeypatch.setattr(cli, "PLOT_GROUPS", (1, 4, 64))
    png = tmp_path / "frontier.png"
    assert main([*ARGS, "--fsdp", "8", "--json", "--plot", str(png)]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["estimate"] is True and "plot written" in captured.err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_table_shows_step_time_beside_capacity(capsys):
    assert main([*ARGS, "--fsdp", "8", "--prompt", "32768"]) == 0
    out = capsys.readouterr().out
    expected = frontier("llama3-8b", "80GiB", 16, 1024, shards=Shards(fsdp=8), prompt_len=32768)
    assert "step time - ESTIMATE at P=32,768" in out and "h200" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    for name, f in expected.schedules.items():
        limit, seconds, rel = rows[name].split()[3:6]
        assert limit == f.limit
        if f.time is None:  # dense and plain reuse cannot hold a 32k prompt in 80 GiB
            assert rows[name].split()[4:7] == ["-", "no", "fit"] and f.max_prompt_len < 32768
        else:
            assert seconds == f"{f.time.seconds:,.2f}" and rel.endswith("x")
    assert expected["dense+ckpt"].time is not None and expected["dense"].time is None


def test_json_carries_the_step_time(capsys):
    assert main([*ARGS, "--fsdp", "8", "--prompt", "32768", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = frontier("llama3-8b", "80GiB", 16, 1024, shards=Shards(fsdp=8), prompt_len=32768)
    assert out["prompt_len"] == 32768 and out["card"] == "h200"
    for name, f in expected.schedules.items():
        got = out["schedules"][name]["time_at_prompt_len"]
        if f.time is None:
            assert got is None
        else:
            assert got["step_seconds"] == f.time.seconds
            assert got["recomputed_layers"] == f.time.recomputed_layers


def test_help_shows_defaults(capsys):
    assert main(["frontier", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for default in ("(default: 0.05)", "(default: bfloat16)", "(default: adamw)",
                    "(default: h200)", "(default: 1)"):  # fmt: skip
        assert default in out, default
    assert "(default: None)" not in out and "(default: False)" not in out


@pytest.mark.parametrize(
    "extra, needle",
    [
        # a bare number would silently mean bytes
        (["--hbm", "80"], "argument --hbm: needs a unit, e.g. 80GiB"),
        # argparse read "-80GiB" as an option and said "expected one argument"
        (["--hbm", "-80GiB"], "argument --hbm: must be a positive size"),
        (["--hbm", "0GiB"], "argument --hbm: must be a positive size"),
        (["--margin", "1.5"], "argument --margin: must be a fraction of --hbm in [0, 1)"),
        (["--margin", "-0.1"], "argument --margin: must be a fraction"),
        (["--tp", "3"], "--tp must divide the model's 32 query heads and 8 key/value heads"),
        (["--tp", "64"], "--tp must divide the model's 32 query heads and 8 key/value heads"),
        (["--tp", "16"], "(one of [1, 2, 4, 8]), got 16"),
        (["--rows", "0"], "argument --rows: must be an integer >= 1, got '0'"),
        (["--prompt", "1"], "argument --prompt: must be an integer >= 2, got '1'"),
        (["--group", "-4"], "argument --group: must be an integer >= 1, got '-4'"),
    ],
)
def test_cli_edges_name_the_option_and_the_value(extra, needle, capsys):
    assert main([*ARGS, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert needle in captured.err, captured.err
    for internal in ("fragmentation", "shards.", "rows_per_microbatch", "expected one argument"):
        assert internal not in captured.err


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
        (["frontier", "--preset", "qwen3-8b", "--hbm", "80GB", "--group", "0", "--response", "8"], "--group: must be an integer >= 1, got '0'"),
        (["frontier", "--preset", "qwen3-8b", "--hbm", "80GB", "--group", "x", "--response", "8"], "'x'"),
        (["frontier", "--hbm", "80GB", "--group", "1", "--response", "8"], "--preset"),
        (["frontier", "--preset", "qwen3-8b", "--config", "c.json", "--hbm", "1GB", "--group", "1",
          "--response", "8"], "not allowed"),
        (["frontier", "--config", "/nonexistent/config.json", "--hbm", "80GB", "--group", "1",
          "--response", "8"], "config.json"),
        (["frontier", "--preset", "qwen3-8b", "--hbm", "80GB", "--group", "1", "--response", "8",
          "--fsdp", "0"], "--fsdp: must be an integer >= 1, got '0'"),
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


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--schedules", "dense,reuse+recompute"], "--schedules: must be a comma-separated list"),
        (["--layers", "0"], "--layers: must be an integer >= 1, got '0'"),
        (["--time-limit", "-5"], "--time-limit: must be a number > 0"),
    ],
)
def test_measuring_tool_names_bad_options(argv, needle, capsys):
    from tools.frontier import main as tool_main

    with pytest.raises(SystemExit) as exc:
        tool_main(argv)
    assert exc.value.code == 2 and needle in capsys.readouterr().err


def test_measuring_tool_help_shows_defaults(capsys):
    from tools.frontier import main as tool_main

    with pytest.raises(SystemExit):
        tool_main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 4)" in out and "(default: dense,reuse,reuse+offload,dense+ckpt)" in out


def test_plot_draws_a_line_that_another_covers_wider_underneath():
    same, other = [1.0, 2.0, 3.0], [10.0, 20.0, 30.0]
    # drawn in order: the first coincides with the second and third, the second with the third
    assert cli._widths([same, same, [1.0, 5.0, 9.0], other], 0.01) == [
        1.6 + 2 * 2.2,
        1.6 + 2.2,
        1.6,
        1.6,
    ]
    nan = float("nan")  # no point (does not fit) never counts as coinciding
    assert cli._widths([[nan, 2.0], [nan, 3.0]], 0.01, log=True) == [1.6, 1.6]


@pytest.mark.parametrize(
    "extra", [["--fsdp", "8", "--dtype", "float32"], []], ids=["no-rate", "nothing-fits"]
)
def test_plot_without_step_times_says_why(extra, tmp_path, capsys, monkeypatch):
    # fp32 has no measured rate, and 8B with AdamW on one 80 GiB device fits nothing: the
    # speed panel says so (it once failed to render an annotation on an empty log axis)
    pytest.importorskip("matplotlib", reason="--plot needs the optional matplotlib extra")
    monkeypatch.setattr(cli, "PLOT_POINTS", 2)
    monkeypatch.setattr(cli, "PLOT_GROUPS", (1,))
    png = tmp_path / "frontier.png"
    assert main([*ARGS, *extra, "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "step time: not estimated" in capsys.readouterr().out
