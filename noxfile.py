"""Sessions: `nox -s tests` (the fast tier), `nox -s tests_slow`, `nox -s tests_oldest`, `nox -s regression`,
`nox -s bench -- --method all`, `nox -s leaderboard -- --results DIR`.

torch and torchvision are pinned as a pair: PyPI's builds of these two versions import together on
CPU-only and CUDA machines alike (a mismatched pair fails at `import torchvision`).
"""

from pathlib import Path

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["tests"]

PYTHON = "3.11"
TORCH = ["torch==2.13.0", "torchvision==0.28.0"]
TIMM_FLOOR = "timm==1.0.21"  # the oldest timm tokenbench runs on (pyproject.toml's floor): tests_oldest checks it
TESTS = ["tests", "--pyargs", "tokenbench.testing"]  # the suite, and the conformance suite as installed
# One pytest worker per core, one torch thread each: the tests run small models, for which two processes of one
# thread beat one of two (4 min 15 s against 6 min 27 s for the fast tier on 2 cores), and threads of different
# processes never contend for a core.
PARALLEL = ["-n", "auto"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def install(session, extras=None):
    target = f".[{extras}]" if extras else "."
    session.install(*TORCH, "-e", target)


def option_value(args, name):
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


@nox.session(python=PYTHON)
def tests(session):
    """The fast tier of the test suite and the conformance suite (or pass pytest arguments after --)."""
    install(session, "test")
    session.install("pip", "setuptools")  # the plugin test installs a package with pip
    session.run("pytest", *(session.posargs or [*PARALLEL, "-m", "not slow", *TESTS]), env=ONE_THREAD)


@nox.session(python=PYTHON, default=False)
def tests_slow(session):
    """The slow tier (`-m slow`): subprocess sweeps, real-data runs, searches; CI runs it after the fast tier."""
    install(session, "test")
    session.install("pip", "setuptools")
    session.run("pytest", "-m", "slow", *(session.posargs or [*PARALLEL, *TESTS]), env=ONE_THREAD)


@nox.session(python=PYTHON, default=False)
def tests_oldest(session):
    """The fast tests on the oldest timm tokenbench claims to support."""
    install(session, "test")
    session.install("pip", "setuptools", TIMM_FLOOR)
    session.run("pytest", "-m", "not slow", *(session.posargs or [*PARALLEL, *TESTS]), env=ONE_THREAD)


@nox.session(python=PYTHON, default=False)
def bench(session):
    """Sweep methods and regenerate the leaderboard: nox -s bench -- --method all [--out DIR ...]."""
    install(session)
    args = list(session.posargs) or ["--method", "all"]
    out = option_value(args, "--out")
    if out is None:
        out = "runs/bench"
        args += ["--out", out]
    session.run("tokenbench", "bench", *args, env={"PYTHONUNBUFFERED": "1"})
    session.run("tokenbench", "leaderboard", "--results", out)


@nox.session(python=PYTHON, default=False)
def leaderboard(session):
    """Regenerate leaderboard.md and plots: nox -s leaderboard -- --results DIR."""
    install(session)
    session.run("tokenbench", "leaderboard", *(session.posargs or ["--results", "results/digits"]))


@nox.session(python=PYTHON, default=False)
def regression(session):
    """CI gate: each method's tokens/GMACs snapshot and speedup over dense (-- --update rewrites them)."""
    install(session, "test")
    one_thread = {**ONE_THREAD, "PYTHONUNBUFFERED": "1"}
    session.run("tokenbench", "regression", *session.posargs, env=one_thread)
    if "--update" not in session.posargs:
        Path("runs/regression").mkdir(parents=True, exist_ok=True)
        session.run("pytest", "tests/benchmarks", "--benchmark-storage=.benchmarks", "--benchmark-autosave",
                    "--benchmark-json=runs/regression/micro.json", "--benchmark-compare", env=one_thread)
