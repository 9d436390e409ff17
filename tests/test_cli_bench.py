"""`smolvlm-fast bench`: lists the checkout's benchmarks, runs one with its arguments, refuses an unknown name."""
import json

from smolvlm_fast import cli


def test_lists_the_benchmarks(capsys):
    assert cli.main(["bench"]) == 0
    names = capsys.readouterr().out.split()
    assert {"bench_e2e", "bench_xattn", "fuzz_readers", "make_table"} <= set(names) and "common" not in names


def test_runs_one_with_its_arguments(tmp_path, capfd):
    rows = tmp_path / "rows.jsonl"
    row = {"bench": "b", "device": "d", "case": "c/decode", "shape": "s", "dtype": "float32", "metric": "tok/s",
           "impl": "smolvlm_fast", "median": 12.5, "baseline": None, "ratio": None, "commit": "x", "time": "t"}
    rows.write_text(json.dumps(row) + "\n")
    assert cli.main(["bench", "make_table", str(rows)]) == 0
    assert "c/decode" in capfd.readouterr().out


def test_an_unknown_benchmark_is_a_clear_error(capsys):
    assert cli.main(["bench", "bench_nothing"]) == 2
    assert "no benchmark 'bench_nothing'" in capsys.readouterr().err
