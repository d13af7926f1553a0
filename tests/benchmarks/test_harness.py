"""The benchmark harness (benchmarks/harness.py): the README it writes is current, and the
pieces every benchmark relies on (seeds, results files, child processes, arguments) work.
Fast, and without any data set: no benchmark is run."""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import harness
import pytest
import reports


def test_the_readme_is_written_from_the_results_as_they_are() -> None:
    """A stale benchmarks/README.md fails here: a results file, a script's docstring or a table
    changed without `python benchmarks/harness.py readme`."""
    assert harness.README.read_text(encoding="utf-8") == harness.readme(), (
        "benchmarks/README.md is stale: run `python benchmarks/harness.py readme`"
    )


def test_every_script_is_a_benchmark_with_a_table_or_a_helper() -> None:
    scripts = {path.stem for path in harness.HERE.glob("*.py")}
    benchmarks = {name for group in harness.BENCHMARKS.values() for name in group}
    assert scripts == benchmarks | set(harness.HELPERS)
    assert set(reports.RENDERERS) == benchmarks
    for name in benchmarks:
        summary, commands = harness.docstring(name)
        assert summary and any(f"benchmarks/{name}.py" in line for line in commands), name


def test_every_results_file_belongs_to_a_benchmark() -> None:
    names = list(reports.RENDERERS)
    assert harness.owner("banking77.json", names) == "banking77"
    assert harness.owner("banking77_tune_curves.png", names) == "banking77_tune"
    assert harness.owner("banking77_unlabelled-h200.json", names) == "banking77_unlabelled"
    assert harness.owner("banking77x.json", names) is None
    assert all(harness.owner(p.name, names) for p in harness.RESULTS.iterdir())


def test_spread_is_the_mean_and_population_sd_over_seeds() -> None:
    values = [0.8711, 0.8737, 0.8711]
    s = harness.spread(values)
    assert s.mean == pytest.approx(statistics.mean(values))
    assert s.sd == pytest.approx(statistics.pstdev(values))  # population sd, as the tables say
    assert s.sd != pytest.approx(statistics.stdev(values))
    assert (s.low, s.high, s.n) == (0.8711, 0.8737, 3)
    assert harness.mean_sd(values) == "87.20% ± 0.12%"
    assert harness.spread([0.5]).sd == 0.0
    with pytest.raises(ValueError):
        harness.spread([])


def test_keep_latest_replaces_a_run_of_the_same_key() -> None:
    runs = [{"mode": "none", "seed": 1, "x": 1}, {"mode": "joint", "seed": 1, "x": 2}]
    new = {"mode": "none", "seed": 1, "x": 3}
    kept = harness.keep_latest(runs, new, key=lambda r: (r["mode"], r["seed"]))
    assert kept == [runs[1], new]


def _banking77_result() -> dict:
    run = {
        "run": "few_shot@seed1",
        "seed": 1,
        "train_file": "train_10.csv",
        "source_file": None,
        "source_seconds": None,
        "test_accuracy": 0.8711,
        "test_macro_f1": 0.8704,
        "train_seconds": 528.0,
        "epochs_run": 10,
        "peak_rss_gib": 1.53,
        "published": "RoBERTa-base 84.27%",
    }
    return {"machine": "test machine", "runs": {run["run"]: run}}


def test_results_are_written_as_json_and_their_table_and_read_back(tmp_path: Path) -> None:
    readme_before = harness.README.read_text(encoding="utf-8")
    result = _banking77_result()
    seen = []
    text = harness.save("banking77", result, tmp_path, "t", also=seen.append, echo=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["banking77-t.json", "banking77-t.md"]
    assert seen == [tmp_path / "banking77-t.json"]
    assert json.loads((tmp_path / "banking77-t.json").read_text()) == result
    assert harness.load("banking77", tmp_path, "t") == result
    assert harness.load("banking77", tmp_path) == {}  # untagged: none
    assert (tmp_path / "banking77-t.md").read_text() == text == reports.render("banking77", result)
    assert "Measured on test machine." in text
    assert "| few_shot | 1 | 87.11% ± 0.00% | 87.11% – 87.11% |" in text
    # Written elsewhere than benchmarks/results: the README is not touched.
    assert harness.README.read_text(encoding="utf-8") == readme_before
    harness.save("banking77", result, tmp_path, file_stem="stem", echo=False)
    assert (tmp_path / "stem.json").is_file() and (tmp_path / "stem.md").is_file()


def test_a_failed_table_still_leaves_the_json(tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        harness.save("banking77", {"machine": "m"}, tmp_path, echo=False)
    assert json.loads((tmp_path / "banking77.json").read_text()) == {"machine": "m"}


def test_a_child_gives_its_json_exit_code_wall_time_and_memory() -> None:
    code = "import sys, time; print('progress'); sys.stderr.write('log\\n'); time.sleep(0.2); print('[1]')"
    child = harness.run_child([sys.executable, "-c", code])
    assert child.returncode == 0
    assert child.json() == [1]
    assert child.stderr_tail == "log"
    assert 0.2 <= child.wall_seconds < 30
    assert 0.001 < child.peak_rss_gib < 4


def test_a_failed_child_says_why_with_its_stderr() -> None:
    code = "import sys; sys.stderr.write('Traceback: boom\\n'); sys.exit(3)"
    with pytest.raises(harness.ChildError) as failed:
        harness.run_child([sys.executable, "-c", code])
    assert "exited with 3" in str(failed.value) and "Traceback: boom" in str(failed.value)
    assert failed.value.child.returncode == 3
    assert harness.run_child([sys.executable, "-c", code], check=False).returncode == 3
    silent = harness.run_child([sys.executable, "-c", "print('no json')"])
    with pytest.raises(harness.ChildError, match="printed no JSON object last"):
        silent.json()


def test_rerun_runs_the_script_for_one_run_with_the_shared_options(tmp_path: Path) -> None:
    script = tmp_path / "echo.py"
    script.write_text("import json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    args = argparse.Namespace(data_dir=Path("/data"), work=Path("/work"))
    got = harness.rerun(str(script), args, "few_shot", 10, seed=2).json()
    assert got == ["--one", "few_shot", "10", "--seeds", "2", "--data-dir", "/data", "--work", "/work"]
    got = harness.rerun(str(script), argparse.Namespace(), "x", seed=1).json()
    assert got == ["--one", "x", "--seeds", "1"]


CHILD = """\
import sys
sys.path.insert(0, {here!r})
import harness


def run(*one, seed, data, work):
    return {{"one": one, "seed": seed, "data": str(data), "work": str(work)}}


args = harness.parser("x", data=True, seeds=[1], work="w", one=True).parse_args()
assert harness.answer(args, run)
"""


def test_a_child_answers_its_parent_through_the_one_run_protocol(tmp_path: Path) -> None:
    script = tmp_path / "bench.py"
    script.write_text(CHILD.format(here=str(harness.HERE)))
    args = argparse.Namespace(data_dir=Path("/d"), work=Path("/w"))
    got = harness.rerun(str(script), args, "joint", 10, seed=7).json()
    assert got == {"one": ["joint", "10"], "seed": 7, "data": "/d", "work": "/w"}
    assert not harness.answer(argparse.Namespace(one=None), run=dict)  # a parent: nothing done


def test_the_common_arguments() -> None:
    parser = harness.parser("doc", data=True, seeds=[1, 2, 3], work="multitask", one=True)
    args = parser.parse_args([])
    assert args.data_dir == harness.DATA and args.data_dir.parts[-2:] == ("shared", "data")
    assert args.seeds == [1, 2, 3]
    assert args.work == harness.HERE / "work" / "multitask"
    assert (args.results, args.tag, args.one) == (harness.RESULTS, "", None)
    args = parser.parse_args(["--seeds", "4", "--tag", "gpu", "--one", "joint", "10", "--data-dir", "d"])
    assert (args.seeds, args.tag, args.one, args.data_dir) == ([4], "gpu", ["joint", "10"], Path("d"))
    assert "--one" not in parser.format_help()  # a child's option, not a user's
    bare = harness.parser("doc", results=False).parse_args([])
    assert vars(bare) == {}
    assert harness.parser(None, work="").parse_args([]).work == harness.HERE / "work"


def test_require_exits_with_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "banking77").mkdir()
    (tmp_path / "banking77" / "train_10.csv").write_text("text,label\n")
    harness.require(tmp_path, "banking77/train_10.csv", what="BANKING77")
    with pytest.raises(SystemExit, match=r"BANKING77 not found under .*; pass --data-dir"):
        harness.require(tmp_path, "banking77/test.csv", what="BANKING77")


def test_stop_ends_a_server_and_kills_one_that_will_not_stop() -> None:
    # SIGINT as a terminal gives it: a job started in the background inherits it ignored.
    polite = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    start = time.monotonic()
    assert harness.stop(polite, grace=30) != 0  # SIGINT: KeyboardInterrupt
    assert time.monotonic() - start < 20  # it stopped, not killed after the grace
    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('ready', flush=True); "
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    stubborn.stdout.readline()  # SIGINT ignored from here on
    start = time.monotonic()
    assert harness.stop(stubborn, grace=0.5) == -signal.SIGKILL
    assert time.monotonic() - start < 30
    stubborn.stdout.close()


def test_the_machine_in_one_line() -> None:
    line = harness.machine(threads=3, note="a note")
    assert "CPUs" in line and "3 torch threads" in line and "torch " in line and line.endswith("a note")
    assert "\n" not in line


def test_a_scripts_summary_and_commands_come_from_its_docstring() -> None:
    summary, commands = harness.docstring("banking77")
    assert summary.startswith("BANKING77 benchmark of the default recipe")
    assert commands[0].startswith("python benchmarks/banking77.py")
    assert harness.headline("A thing: what it does. More.") == "A thing"
    assert harness.headline("Does it? It does: yes.") == "Does it?"
    assert harness.headline("Plain sentence. Another.") == "Plain sentence"
