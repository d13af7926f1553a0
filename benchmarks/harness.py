"""The benchmark harness: what every script in benchmarks/ shares, so that a script holds only
what it measures.

- Arguments: `parser()`, the options the scripts have in common (--data-dir, --seeds, --work,
  --results, --tag, and the hidden --one of a child run), with the same defaults everywhere.
- Seeds: `spread()` and `mean_sd()`, a figure's mean and spread over the seeds run (population
  standard deviation: the seeds run are the population the tables speak of).
- Child processes: `run_child()` runs a command (the script itself for one run, `python -m
  tuning`, a peer's Python) and gives its exit code, wall time and peak resident memory; it
  streams the child's stderr and raises `ChildError`, with the end of that stderr, when the
  child fails. `rerun()` is the one-run protocol: the script again with `--one ...`, answering
  with one JSON object printed last (`answer()`, `emit()`). `stop()` ends a server started
  in the background.
- The machine: `machine()`, one line: CPU, CPUs, torch threads and version, GPU or CPU only.
- Results: `save()` writes results/<name>[-<tag>].json, then its markdown table (rendered from
  that JSON by reports.py) and benchmarks/README.md again; `load()` reads a results file back.
- The README: `python benchmarks/harness.py readme` writes benchmarks/README.md from the
  scripts' docstrings and results/*.json (`--check`: exit 1 where the file is stale, as
  tests/benchmarks/test_harness.py does).

Standard library only at import (`machine()` imports torch when called), so that the SetFit
peer's own environment and the README check import it in no time.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = ROOT.parent / "shared" / "data"  # the data sets, beside the repository
WORK = HERE / "work"  # registries and scratch files of the runs
RESULTS = HERE / "results"
README = HERE / "README.md"

# The benchmarks, in the README's order, and the scripts that serve them.
BENCHMARKS: dict[str, tuple[str, ...]] = {
    "Accuracy and training": (
        "banking77",
        "banking77_tune",
        "banking77_unlabelled",
        "multitask",
        "out_of_scope",
        "oos_shift",
        "heads_cost",
        "review_loop",
        "emerging_intents",
        "multi_intent",
        "runtime_accuracy",
    ),
    "Serving": ("cpu_serving", "serve_load", "capture_cost", "serve_faults"),
}
HELPERS = ("harness", "reports", "setfit_peer", "peer_app", "floor_app")
STDERR_TAIL = 40  # lines of a failed child's stderr its ChildError repeats


# -- arguments ------------------------------------------------------------------------------


def parser(
    doc: str | None,
    *,
    data: bool = False,
    seeds: Sequence[int] | None = None,
    work: str | None = None,
    results: bool = True,
    one: bool = False,
) -> argparse.ArgumentParser:
    """The script's parser, its docstring as the description, with the options benchmarks
    share: --data-dir (`data`), --seeds (`seeds`: their default), --work (`work`: a folder
    under benchmarks/work, "" for benchmarks/work itself), --results and --tag (`results`),
    and the hidden --one of a child run (`one`)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if data:
        p.add_argument("--data-dir", type=Path, default=DATA, help="the data sets [default: ../shared/data]")
    if seeds is not None:
        p.add_argument(
            "--seeds",
            nargs="+",
            type=int,
            default=list(seeds),
            help=f"runtime.seed of each run [default: {' '.join(map(str, seeds))}]",
        )
    if work is not None:
        p.add_argument(
            "--work",
            type=Path,
            default=WORK / work,
            help=f"registry and scratch files of the runs [default: {(WORK / work).relative_to(ROOT)}]",
        )
    if results:
        p.add_argument(
            "--results", type=Path, default=RESULTS, help="results folder [default: benchmarks/results]"
        )
        p.add_argument("--tag", default="", help="results file suffix, to keep several runs: NAME-TAG.json")
    if one:
        p.add_argument("--one", nargs="+", help=argparse.SUPPRESS)  # a child: one run, JSON out
    return p


def require(data_dir: Path, *files: str, what: str, hint: str = "pass --data-dir") -> None:
    """Exit with a message unless every file is under data_dir."""
    if not all((data_dir / f).is_file() for f in files):
        sys.exit(f"error: {what} not found under {data_dir}; {hint}")


# -- seeds ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    """A figure over seeds: mean, population standard deviation (0 for one seed), range."""

    mean: float
    sd: float
    low: float
    high: float
    n: int


def spread(values: Iterable[float]) -> Spread:
    values = list(values)
    if not values:
        raise ValueError("a spread of no values")
    sd = statistics.pstdev(values) if len(values) > 1 else 0.0
    return Spread(statistics.mean(values), sd, min(values), max(values), len(values))


def mean_sd(values: Iterable[float]) -> str:
    """Accuracies as "mean ± sd" in percent."""
    s = spread(values)
    return f"{s.mean:.2%} ± {s.sd:.2%}"


def keep_latest(runs: list[dict], new: dict, key: Callable[[dict], object]) -> list[dict]:
    """The runs, an earlier run of the same key replaced by `new` (at the end)."""
    return [r for r in runs if key(r) != key(new)] + [new]


# -- child processes ------------------------------------------------------------------------


class ChildError(RuntimeError):
    """A child process that failed, or did not answer: its command, and the end of its stderr."""

    def __init__(self, child: Child, why: str) -> None:
        super().__init__(
            f"{shlex.join(child.command)} {why}"
            + (f"; the end of its stderr:\n{child.stderr_tail}" if child.stderr_tail else "")
        )
        self.child = child


@dataclass
class Child:
    command: list[str]
    returncode: int
    stdout: str
    stderr_tail: str  # its last STDERR_TAIL lines (all of it was streamed to our stderr)
    wall_seconds: float
    peak_rss_gib: float  # the child's own peak resident memory

    def json(self) -> dict:
        """The JSON object the child printed last (`emit`)."""
        lines = self.stdout.strip().splitlines()
        try:
            return json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError) as err:
            raise ChildError(self, "printed no JSON object last") from err


def run_child(
    command: Sequence[object], *, cwd: Path | None = None, env: dict | None = None, check: bool = True
) -> Child:
    """Run a command to its end: its stdout kept, its stderr streamed to ours (training logs)
    with the end kept, its wall time and its peak resident memory (from wait4: the child's
    alone, so one run's memory is its own). `check`: raise ChildError when it fails."""
    command = [str(c) for c in command]
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace"
    )
    tail: deque[str] = deque(maxlen=STDERR_TAIL)

    def pump() -> None:
        for line in proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            tail.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    stdout = proc.stdout.read()
    reader.join()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    proc.stderr.close()
    kib = 1 / 1024 if sys.platform == "darwin" else 1  # ru_maxrss: bytes on macOS, KiB on Linux
    child = Child(
        command=command,
        returncode=proc.returncode,
        stdout=stdout,
        stderr_tail="".join(tail).rstrip("\n"),
        wall_seconds=time.perf_counter() - start,
        peak_rss_gib=usage.ru_maxrss * kib / 2**20,
    )
    if check and child.returncode != 0:
        raise ChildError(child, f"exited with {child.returncode}")
    return child


def rerun(script: str, args: argparse.Namespace, *one: object, seed: int) -> Child:
    """The script again, in a process of its own, for one run (its peak memory its own):
    `script --one ONE... --seeds SEED`, with the parent's --data-dir and --work."""
    command = [sys.executable, script, "--one", *map(str, one), "--seeds", str(seed)]
    for flag, dest in (("--data-dir", "data_dir"), ("--work", "work")):
        if getattr(args, dest, None) is not None:
            command += [flag, str(getattr(args, dest))]
    return run_child(command)


def seed_runs(name: str, script: str, args: argparse.Namespace) -> dict:
    """Each of --seeds run by `rerun`, its answer (with its peak memory) saved as soon as it
    comes, beside the earlier seeds' answers: results/<name>.json is {"machine", "runs": {seed:
    answer}}. Returns that."""
    result = {"machine": machine(), "runs": load(name, args.results, args.tag).get("runs", {})}
    for seed in args.seeds:
        print(f"== seed {seed}", flush=True)
        child = rerun(script, args, "seed", seed=seed)
        result["runs"][str(seed)] = {**child.json(), "peak_rss_gib": child.peak_rss_gib}
        print(json.dumps(result["runs"][str(seed)], indent=2), flush=True)
        save(name, result, args.results, args.tag)
    return result


def seeded_main(doc: str | None, name: str, script: str, run: Callable[..., dict]) -> None:
    """The whole `main` of a benchmark that runs each seed on BANKING77 in a child of its own
    (`run(step, seed=, data=, work=)` there; `seed_runs` here)."""
    args = parser(doc, data=True, seeds=[1, 2, 3], work=name, one=True).parse_args()
    if answer(args, run):
        return
    require(args.data_dir, "banking77/train_10.csv", what="BANKING77")
    seed_runs(name, script, args)


def emit(result: dict) -> None:
    """A child's answer: one JSON object, printed last."""
    print(json.dumps(result), flush=True)


def answer(args: argparse.Namespace, run: Callable[..., dict]) -> bool:
    """The child's side of `rerun`: where --one was given, `run(*ONE, seed=, data=, work=)`
    and its result printed (`emit`); True then, and the script has nothing more to do."""
    if not getattr(args, "one", None):
        return False
    emit(run(*args.one, seed=args.seeds[0], data=args.data_dir, work=args.work))
    return True


def stop(
    proc: subprocess.Popen, grace: float = 120, sig: int = signal.SIGINT, log: Path | None = None
) -> int:
    """End a server started in the background: `sig` (SIGINT: `serve run` shuts its app and its
    local Ray down), then SIGKILL if it has not exited within `grace` seconds."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        name = Path(str(proc.args[0] if isinstance(proc.args, list | tuple) else proc.args)).name
        seen = f" (see {log})" if log else ""
        print(f"warning: {name} did not stop within {grace:g} s; killed{seen}", file=sys.stderr)
        return proc.wait()


# -- the machine ----------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine(threads: int | None = None, note: str = "") -> str:
    """This machine in one line: architecture and CPU model, CPUs, torch threads (`threads`, or
    torch's own count) and version, the GPU or "CPU only", and a note."""
    model = cpu_model()
    parts = [f"{platform.machine()} ({model})" if model else platform.machine(), f"{os.cpu_count()} CPUs"]
    try:
        import torch
    except ImportError:
        parts.append("no torch")
    else:
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"
        parts += [f"{threads or torch.get_num_threads()} torch threads", f"torch {torch.__version__}", gpu]
    return ", ".join([*parts, note] if note else parts)


# -- results --------------------------------------------------------------------------------


def _reports():
    import reports  # its tables import this module: imported when first needed

    return reports


def stem(name: str, tag: str = "") -> str:
    return f"{name}-{tag}" if tag else name


def load(name: str, directory: Path = RESULTS, tag: str = "") -> dict:
    """A results file read back ({} where there is none)."""
    path = directory / f"{stem(name, tag)}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def save(
    name: str,
    result: dict,
    directory: Path = RESULTS,
    tag: str = "",
    *,
    file_stem: str | None = None,
    also: Callable[[Path], object] | None = None,
    echo: bool = True,
) -> str:
    """Benchmark `name`'s result as <directory>/<name>[-<tag>].json (or <file_stem>.json); its
    table (reports.py renders it from that JSON) as .md beside it; `also(json_path)`, where
    given, writes the run's other files (a plot) beside them; then benchmarks/README.md again
    where the directory is benchmarks/results. Returns the table, printed too (`echo`)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{file_stem or stem(name, tag)}.json"
    path.write_text(json.dumps(result, indent=2))  # first: kept whatever fails after
    text = _reports().render(name, result)
    path.with_suffix(".md").write_text(text)
    if also is not None:
        also(path)
    if directory.resolve() == RESULTS:
        write_readme()
    if echo:
        print(text, flush=True)
    return text


# -- the README -----------------------------------------------------------------------------


def docstring(script: str) -> tuple[str, list[str]]:
    """A script's first docstring paragraph, on one line, and its first indented block (the
    commands), read without importing it."""
    doc = ast.get_docstring(ast.parse((HERE / f"{script}.py").read_text(encoding="utf-8"))) or ""
    paragraphs = doc.split("\n\n")
    commands: list[str] = []
    for paragraph in paragraphs[1:]:
        lines = paragraph.splitlines()
        if lines and all(line.startswith("    ") for line in lines):
            commands = [line[4:] for line in lines]
            break
    return " ".join(paragraphs[0].split()), commands


def headline(summary: str) -> str:
    """The summary's first clause: up to its first colon, full stop or question mark."""
    cut = min((i for i in (summary.find(": "), summary.find(". ")) if i >= 0), default=len(summary))
    question = summary.find("? ")
    return summary[: question + 1] if 0 <= question < cut else summary[:cut].rstrip(".")


def owner(filename: str, names: Iterable[str]) -> str | None:
    """The benchmark a results file belongs to: the longest name it starts with, then . - or _."""
    found = [n for n in names if filename.startswith(n) and filename[len(n) : len(n) + 1] in (".", "-", "_")]
    return max(found, key=len, default=None)


def demote(text: str, levels: int = 3) -> str:
    """A table's headings, a few levels down, to sit under the README's own."""
    return "\n".join("#" * levels + line if line.startswith("#") else line for line in text.splitlines())


INTRO = """\
# Benchmarks

<!-- Written by `python benchmarks/harness.py readme` from the scripts' docstrings and
     results/*.json: edit those, not this file. -->

What each script in `benchmarks/` measures, how to run it, and what it measured last. The
tables are rendered from `results/*.json` by `reports.py`; each benchmark run rewrites its
results files and this page (`python benchmarks/harness.py readme` rewrites it by hand), and
`tests/benchmarks/test_harness.py` fails while the page is stale. Numbers move from run to
run; their history is in the commit log.

Options the scripts share (`harness.py`; each script's `--help` says which it takes):

| option | meaning | default |
| --- | --- | --- |
| `--data-dir` | the data sets (BANKING77, CLINC150, BANKING77-OOS) | `../shared/data` |
| `--seeds` | `runtime.seed` of each run; tables give mean ± sd over them (population sd) | per script |
| `--work` | registries and scratch files of the runs | `benchmarks/work/<script>` |
| `--results` | the results folder | `benchmarks/results` |
| `--tag` | results file suffix, to keep several runs: `results/<name>-<tag>.{json,md}` | none |

Runs that train do so in a process of their own (`harness.run_child`: the wall time and peak
memory are the run's own), and every results file names the machine it was measured on.
"""


def readme(directory: Path = RESULTS) -> str:
    """benchmarks/README.md's text, from the scripts' docstrings and the results files."""
    names = [n for group in BENCHMARKS.values() for n in group]
    files: dict[str | None, list[str]] = {n: [] for n in [*names, None]}
    for path in sorted(directory.iterdir()) if directory.is_dir() else []:
        if path.is_file():
            files[owner(path.name, names)].append(path.name)
    lines = [INTRO, "| benchmark | measures | results | measured on |", "| --- | --- | --- | --- |"]
    for name in names:
        result = load(name, directory)
        where = f"[{name}.json](results/{name}.json)" if result else "none yet"
        if tagged := len(_tagged(name, files[name])):
            where += f" (+{tagged} tagged)"
        summary = headline(docstring(name)[0])
        lines.append(f"| [{name}](#{name}) | {summary} | {where} | {result.get('machine', '–')} |")
    for group, members in BENCHMARKS.items():
        lines += ["", f"## {group}"]
        for name in members:
            lines += _section(name, files[name], directory)
    lines += ["", "## Helpers", ""]
    lines += [f"- [`{name}.py`]({name}.py): {headline(docstring(name)[0])}." for name in HELPERS]
    if files[None]:
        lines += ["", "Other files in `results/`: " + ", ".join(f"`{f}`" for f in files[None]) + "."]
    return "\n".join(lines) + "\n"


def _tagged(name: str, files: list[str]) -> dict[str, str]:
    """tag → results file, of a benchmark's tagged runs."""
    prefix = f"{name}-"
    return {f[len(prefix) : -len(".json")]: f for f in files if f.startswith(prefix) and f.endswith(".json")}


def _section(name: str, files: list[str], directory: Path) -> list[str]:
    """A benchmark's part of the README: what it measures, its commands, its files, its tables
    (a tagged run's folded)."""
    reports = _reports()
    summary, commands = docstring(name)
    lines = ["", f"### {name}", "", summary]
    if commands:
        lines += ["", "```sh", *commands, "```"]
    listed = ", ".join(f"[`{f}`](results/{f})" for f in files) or "none yet"
    lines += ["", f"Script [`{name}.py`]({name}.py); results (each file from its latest run): {listed}."]
    if (directory / f"{name}.json").is_file():
        lines += ["", demote(reports.render(name, load(name, directory))).rstrip("\n")]
    lines += [f"\n![{f}](results/{f})" for f in files if f.endswith(".png")]
    for tag, f in _tagged(name, files).items():
        table = demote(reports.render(name, load(name, directory, tag)), 4).rstrip("\n")
        lines += ["", '<details markdown="1">', f"<summary>Tagged run {tag}: <code>{f}</code></summary>"]
        lines += ["", table, "", "</details>"]
    return lines


def write_readme() -> bool:
    """Write benchmarks/README.md; True where it changed."""
    text = readme()
    if README.is_file() and README.read_text(encoding="utf-8") == text:
        return False
    README.write_text(text, encoding="utf-8")
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    write = commands.add_parser("readme", help="write benchmarks/README.md from results/*.json")
    write.add_argument("--check", action="store_true", help="write nothing; exit 1 where it is stale")
    args = p.parse_args()
    if args.check:
        if README.is_file() and README.read_text(encoding="utf-8") == readme():
            return
        sys.exit("benchmarks/README.md is stale: run `python benchmarks/harness.py readme`")
    print(f"{README}: {'rewritten' if write_readme() else 'already current'}")


if __name__ == "__main__":
    sys.modules.setdefault("harness", sys.modules["__main__"])  # reports.py imports it by name
    main()
