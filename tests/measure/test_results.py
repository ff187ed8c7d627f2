"""Results storage: whole lines only, torn lines ignored and repaired, stable configuration ids."""

import dataclasses
import json
import subprocess
from pathlib import Path

from tokenbench.measure.results import ResultRow, append_result, cell_id, cpu_name, git_state, read_results


def row(cell: str, **fields) -> ResultRow:
    """A row with every required field filled with a placeholder."""
    required = [f.name for f in dataclasses.fields(ResultRow) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    return ResultRow.from_dict({**{name: 0 for name in required}, "cell_id": cell, **fields})


def test_append_and_read_back(tmp_path):
    path = tmp_path / "results.jsonl"
    append_result(path, row("a", top1=0.5))
    append_result(path, row("b", future_field=[1, 2]))
    assert read_results(path) == [row("a", top1=0.5), row("b", future_field=[1, 2])]
    assert read_results(path)[1].extra == {"future_field": [1, 2]}  # unknown fields survive a round trip


def test_a_torn_last_line_is_ignored_then_cut_before_the_next_append(tmp_path):
    path = tmp_path / "results.jsonl"
    append_result(path, row("a"))
    with open(path, "a") as f:
        f.write('{"cell_id": "b", "half')  # what a crash mid-write could leave
    assert read_results(path) == [row("a")]
    append_result(path, row("c"))
    assert [r.cell_id for r in read_results(path)] == ["a", "c"]
    assert path.read_text().count("\n") == 2 and "half" not in path.read_text()


def test_cell_id_is_stable_and_key_order_free():
    a = {"method": "topk", "knobs": {"keep": 0.7}, "model": "m"}
    b = json.loads(json.dumps({"model": "m", "knobs": {"keep": 0.7}, "method": "topk"}))
    assert cell_id(a) == cell_id(b) and len(cell_id(a)) == 16
    assert cell_id(a) != cell_id({**a, "knobs": {"keep": 0.5}})


def test_missing_file_reads_as_empty(tmp_path):
    assert read_results(tmp_path / "none.jsonl") == []


def test_cpu_name_tells_generations_apart_when_the_model_name_does_not(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n\n"
                    "processor\t: 1\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n")
    assert cpu_name(info) == "AMD EPYC (family 26, model 2)"
    info.write_text("model name\t: Neoverse-V2\n")
    assert cpu_name(info) == "Neoverse-V2"


def test_git_state_is_dirty_for_code_changes_not_for_committed_results(tmp_path):
    state = git_state.__wrapped__  # uncached: git_state is asked once per process

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "results").mkdir()
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "tokenbench"\n')
    (tmp_path / "bench.py").write_text("x = 1\n")
    (tmp_path / "results" / "rows.jsonl").write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    assert state(tmp_path)["git_dirty"] is False
    (tmp_path / "results" / "rows.jsonl").unlink()  # a sweep regenerating a committed leaderboard
    assert state(tmp_path)["git_dirty"] is False
    (tmp_path / "bench.py").write_text("x = 2\n")
    assert state(tmp_path)["git_dirty"] is True


def test_git_state_records_no_commit_for_a_copy_inside_another_repository(tmp_path):
    """A virtual environment inside another project: that project's commit is not tokenbench's."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "someone-else"\n')
    site = tmp_path / ".venv" / "lib" / "site-packages"
    site.mkdir(parents=True)
    (site / "pyproject.toml").write_text('[project]\nname = "tokenbench"\n')
    assert git_state.__wrapped__(site) == {"git_sha": None, "git_dirty": None}
    assert git_state.__wrapped__(tmp_path) == {"git_sha": None, "git_dirty": None}


def test_rows_made_in_this_checkout_record_its_commit():
    """The package finds its own checkout from its file's place (bench/measure/results.py, two below it)."""
    from tokenbench.measure.results import PACKAGE_ROOT

    root = Path(__file__).resolve().parents[2]
    assert PACKAGE_ROOT == root
    if (root / ".git").exists():
        assert git_state.__wrapped__(root)["git_sha"]
