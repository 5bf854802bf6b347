"""``slipstream split`` and ``slipstream plan`` through slipstream.cli.main."""

from __future__ import annotations

import io
import pathlib

import pytest

from slipstream.cache_server.storage.disk import DiskStore
from slipstream.cli import main
from slipstream.splitter.history import Run, Sample, append_run

DATA = pathlib.Path(__file__).parent / "data"
IDS = [
    "tests/test_x.py::TestC::test_y[a-b]",
    "tests/test_x.py::test_plain",
    "tests/sub/test_z.py::test_fails",
    "tests/test_child.py::TestChild::test_base_method",
    "tests/test_new.py::test_unknown",
    "tests/test_flaky.py::test_retry",
    "tests/test_flaky.py::test_other",
]


def run_cli(monkeypatch, capsys, args, stdin=""):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def no_ci_env(monkeypatch):
    for var in ("CIRCLE_NODE_INDEX", "CI_NODE_INDEX", "BUILDKITE_PARALLEL_JOB"):
        monkeypatch.delenv(var, raising=False)


def test_an_id_given_twice_is_printed_once_where_it_first_came(monkeypatch, capsys):
    # The ids are made distinct only when one comes twice (issue 23): the same plan and
    # the same lines as for the ids given once.
    junit = ["--junit", str(DATA / "pytest_*.xml")]
    args = ["split", "--total", "2", "--index", "0", *junit]
    once = run_cli(monkeypatch, capsys, args, "\n".join(IDS) + "\n")
    twice = run_cli(monkeypatch, capsys, args, "\n".join([*IDS, IDS[3], IDS[0]]) + "\n")
    assert once == twice and once[0] == 0 and once[1]


@pytest.mark.parametrize("by", ["auto", "test", "class", "file"])
def test_split_shards_partition_stdin_in_input_order(monkeypatch, capsys, by):
    junit = ["--junit", str(DATA / "pytest_*.xml"), "--junit", str(DATA / "duplicates.xml")]
    seen: list[str] = []
    hashes = set()
    for index in range(3):
        code, out, err = run_cli(
            monkeypatch,
            capsys,
            ["split", "--total", "3", "--index", str(index), "--by", by, *junit],
            "\n".join(IDS) + "\n\n",
        )
        assert code == 0, err
        lines = out.splitlines()
        assert lines == [t for t in IDS if t in lines]  # the input's order
        seen += lines
        assert err.count("\n") == 1 and "plan " in err
        hashes.add(err.rsplit("plan ", 1)[1].strip())
    assert sorted(seen) == sorted(IDS)
    assert len(hashes) == 1  # every runner prints the same plan hash


def test_split_reads_gitlab_variables_one_based(monkeypatch, capsys):
    monkeypatch.setenv("CI_NODE_INDEX", "1")
    monkeypatch.setenv("CI_NODE_TOTAL", "1")
    code, out, err = run_cli(monkeypatch, capsys, ["split", "--quiet"], "\n".join(IDS))
    assert code == 0
    assert out.splitlines() == IDS
    assert "warning: no timings" in err  # the default history is empty here


@pytest.fixture(autouse=True)
def isolated_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["split", "--total", "2"], "give both --index and --total"),
        (["split"], "give --index and --total"),
        (["split", "--total", "2", "--index", "2"], "from 0 to 1"),
        (["split", "--total", "0", "--index", "0"], "at least 1"),
        (["split", "--total", "2", "--index", "0", "--junit", "/nonexistent/*.xml"], "no file"),
        (["split", "--total", "2", "--index", "0", "--suite", "../x"], "suite name"),
        (["plan", "--target", "soon"], "not a duration"),
        (["plan", "--target", "1m", "--overhead", "2m"], "longer than --overhead"),
        (["plan", "--target", "1m"], "no timings to plan from"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(monkeypatch, capsys, args, message):
    code, _, err = run_cli(monkeypatch, capsys, args, "a::b\n")
    assert code == 2
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_bad_choice_is_argparse_exit_2(monkeypatch, capsys):
    with pytest.raises(SystemExit) as info:
        run_cli(monkeypatch, capsys, ["split", "--by", "module"])
    assert info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_not_junit_files_are_warned_about_and_the_rest_used(monkeypatch, capsys):
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        ["split", "--total", "1", "--index", "0", "--junit", str(DATA / "*.xml")],
        "\n".join(IDS),
    )
    assert code == 0 and out.splitlines() == IDS
    warned = [line for line in err.splitlines() if "warning" in line]
    assert len(warned) == 6 and all("; ignored" in line for line in warned)
    assert any("xml_bomb.xml" in line for line in warned)


def test_split_and_plan_from_the_history_store(monkeypatch, capsys, tmp_path):
    store = DiskStore(tmp_path / "store")
    tests = {f"tests/test_{i}.py::test_x": Sample(float(10 * (i + 1)), False) for i in range(6)}
    append_run(store, "default", Run("r1", 1, dict(tests), {}, 5.0))
    store.close()
    stdin = "\n".join(tests)
    outs = []
    for index in range(2):
        code, out, err = run_cli(
            monkeypatch,
            capsys,
            [
                "split",
                "--total",
                "2",
                "--index",
                str(index),
                "--storage-dir",
                str(tmp_path / "store"),
            ],
            stdin,
        )
        assert code == 0, err
        outs.append(out.splitlines())
        # 10..60 into 2: the best is 110|100, plus 5 s start-up; the bound is 5 + 210/2.
        assert "makespan 115.0s, lower bound 110.0s" in err
    assert sorted(outs[0] + outs[1]) == sorted(tests)
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        ["plan", "--target", "2m", "--overhead", "10s", "--storage-dir", str(tmp_path / "store")],
    )
    assert code == 0, err
    chosen = [line for line in out.splitlines() if "fewest" in line]
    # 2 shards: 10 + 115 > 120; 3 shards: 10 + 5 + 70 <= 120.
    assert len(chosen) == 1 and chosen[0].split()[0] == "3"
    code, out, err = run_cli(
        monkeypatch, capsys, ["plan", "--target", "30s", "--storage-dir", str(tmp_path / "store")]
    )
    assert code == 1 and "cannot be split is longer" in out  # a 60 s test never fits 30 s


def test_split_by_file_paths_with_rspec_reports(monkeypatch, capsys):
    files = ["spec/models/user_spec.rb", "./spec/api/orders_spec.rb", "spec/new_spec.rb"]
    outs = []
    for index in range(2):
        code, out, err = run_cli(
            monkeypatch,
            capsys,
            ["split", "--total", "2", "--index", str(index), "--junit", str(DATA / "rspec.xml")],
            "\n".join(files),
        )
        assert code == 0, err
        outs.append(out.splitlines())
    # orders_spec (2.5 s) alone; user_spec (1.25 + 0.75 s) with the new file (2 s, from spec/).
    assert sorted(outs, key=len) == [
        ["./spec/api/orders_spec.rb"],
        ["spec/models/user_spec.rb", "spec/new_spec.rb"],
    ]


def test_reading_the_history_creates_nothing(monkeypatch, capsys, tmp_path):
    default = tmp_path / "xdg" / "slipstream"  # the default history, under XDG_CACHE_HOME
    empty = tmp_path / "empty"
    empty.mkdir()
    for where in ([], ["--storage-dir", str(empty)]):
        code, _, err = run_cli(
            monkeypatch, capsys, ["split", "--total", "2", "--index", "0", *where], "\n".join(IDS)
        )
        assert code == 0 and "warning: no timings" in err, err
        code, _, err = run_cli(monkeypatch, capsys, ["plan", "--target", "1m", *where])
        assert code == 2 and "no timings to plan from" in err
    assert not default.exists() and not (tmp_path / "xdg").exists()
    assert list(empty.iterdir()) == []


def test_a_storage_dir_that_is_not_a_directory_is_one_line(monkeypatch, capsys, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("not a store")
    cases = {
        "/dev/null/x": "history store /dev/null/x: a part of that path is a file",
        str(a_file): f"history store {a_file} is not a directory",
        str(a_file / "x"): "a part of that path is a file",
    }
    for path, message in cases.items():
        for args in (["split", "--total", "2", "--index", "0"], ["plan", "--target", "1m"]):
            code, _, err = run_cli(monkeypatch, capsys, [*args, "--storage-dir", path], "a::b\n")
            assert code == 2, err
            assert err.count("\n") == 1 and "Traceback" not in err
            assert err.startswith(f"slipstream {args[0]}: error: history store ") and message in err


def test_timings_upload_names_a_bad_file_and_takes_a_directory(
    monkeypatch, capsys, tmp_path, server
):
    upload = ["timings", "upload", "--server", server.address, "--suite", "dir"]
    for bad, what in ((DATA / "not_xml.xml", "is not well-formed XML"), (DATA / "jest.xml", "")):
        code, out, err = run_cli(monkeypatch, capsys, [*upload, str(bad)])
        if not what:
            assert code == 0, err  # a JUnit report: control
            continue
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"slipstream timings upload: error: {bad} {what} ("), err
    reports = tmp_path / "reports"
    (reports / "sub").mkdir(parents=True)
    (reports / "a.xml").write_bytes((DATA / "pytest_xunit2.xml").read_bytes())
    (reports / "sub" / "b.xml").write_bytes((DATA / "rspec.xml").read_bytes())
    (reports / "notes.txt").write_text("not a report, not *.xml: left alone")
    code, out, err = run_cli(monkeypatch, capsys, [*upload, str(reports)])
    assert code == 0 and "uploaded 2 reports" in out, err
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        ["split", "--total", "1", "--index", "0", "--junit", str(reports)],
        "\n".join(IDS),
    )
    assert code == 0 and "warning" not in err, err
    (tmp_path / "none").mkdir()
    for args in (upload, ["split", "--total", "1", "--index", "0", "--junit"]):
        code, _, err = run_cli(monkeypatch, capsys, [*args, str(tmp_path / "none")], "a::b\n")
        assert code == 2 and err.count("\n") == 1, err
        assert f"{tmp_path / 'none'} is a directory without .xml files" in err


def test_every_error_line_starts_with_the_whole_command(monkeypatch, capsys, tmp_path):
    cases = {
        ("cache", "save", "--key", "k", str(tmp_path / "absent")): "slipstream cache save",
        ("cache", "restore", "--key", ""): "slipstream cache restore",
        ("timings", "upload", str(tmp_path / "absent.xml")): "slipstream timings upload",
        ("split", "--total", "2"): "slipstream split",
        ("serve", "--listen", "nowhere"): "slipstream serve",
        ("token", "new"): "slipstream token new",
    }
    for args, command in cases.items():
        try:
            code, _, err = run_cli(monkeypatch, capsys, list(args))
        except SystemExit as exc:  # argparse's own errors
            code, err = exc.code, capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, (args, err)
        assert err.startswith(f"{command}: error: "), (args, err)


@pytest.mark.parametrize(
    "command",
    [
        "serve",
        "token new",
        "split",
        "plan",
        "shard",
        "timings upload",
        "cache save",
        "cache restore",
    ],
)
def test_help_is_wrapped_to_the_terminal_and_keeps_its_tables(monkeypatch, capsys, command):
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as info:
        main([*command.split(), "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    too_long = [line for line in text.splitlines() if len(line) > 80]
    assert too_long == [], too_long
    if command in ("shard", "cache save", "cache restore"):
        assert "\nexit status:\n  0   " in text and "\n  2   bad usage\n" in text


def test_plan_echoes_the_target_as_written(monkeypatch, capsys, tmp_path):
    store = DiskStore(tmp_path / "store")
    append_run(store, "default", Run("r1", 1, {"t.py::a": Sample(30.0, False)}, {}, 0.0))
    store.close()
    where = ["--storage-dir", str(tmp_path / "store")]
    for target, overhead, shown in (
        ("20m", "1m", "target 20m with 1m overhead"),
        ("1h30m", "90", "target 1h30m with 90s overhead"),
    ):
        args = ["plan", "--target", target, "--overhead", overhead, *where]
        code, out, err = run_cli(monkeypatch, capsys, args)
        assert code == 0, err
        assert out.splitlines()[0] == f"1 tests, 30.0s in all; {shown}"


def test_split_imports_the_splitter_alone():
    # Each of a matrix's runners starts `slipstream split` once: gRPC and the server's
    # modules would cost it more than the split itself (issue 23).
    import subprocess
    import sys

    probe = (
        "import io, sys; sys.stdin = io.StringIO('tests/test_a.py::test_x\\n'); "
        "from slipstream.cli import main; "
        "code = main(['split', '--total', '2', '--index', '0', '--quiet', '--storage-dir', "
        "sys.argv[1]]); "
        "print(code, sorted(m for m in sys.modules if m.startswith(('grpc', 'slipstream.client'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(DATA)], capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines()[-1] == "0 []"


def test_the_light_parser_of_split_and_plan_is_the_full_ones():
    from slipstream.cli import LIGHT_COMMANDS, build_parser

    def sub_help(parser, command):
        (action,) = [a for a in parser._actions if a.dest == "command"]
        return action.choices[command].format_help()

    full = build_parser()
    for command in LIGHT_COMMANDS:
        assert sub_help(build_parser(command), command) == sub_help(full, command)


def test_split_from_junit_opens_no_store():
    # The disk store and the protobuf it imports are imported only to open a history
    # (issue 23): a `split --junit` needs neither; nor json and uuid, which read and
    # write the history's records. Only what the split imports counts: a hook of the
    # interpreter's start (coverage's, under .ci/test) may import json before it.
    import subprocess
    import sys

    probe = (
        "import io, sys; before = set(sys.modules); "
        "sys.stdin = io.StringIO('tests/test_x.py::test_plain\\n'); "
        "from slipstream.cli import main; "
        "code = main(['split', '--total', '2', '--index', '0', '--quiet', '--junit', "
        "sys.argv[1]]); "
        "print(code, sorted(m for m in set(sys.modules) - before "
        "if m.startswith(('google', 'slipstream.cache_server')) or m in ('json', 'uuid')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(DATA / "pytest_xunit2.xml")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.splitlines()[-1] == "0 []"


@pytest.mark.parametrize("command", ["split", "plan"])
def test_the_cyclic_gc_is_back_on_after_a_split(monkeypatch, capsys, command):
    # split and plan run without the cyclic collector (issue 23), and give it back.
    import gc

    args = ["--junit", str(DATA / "pytest_xunit2.xml")]
    if command == "split":
        args = ["split", "--total", "2", "--index", "0", *args]
    else:
        args = ["plan", "--target", "1h", *args]
    assert gc.isenabled()
    code, _, err = run_cli(monkeypatch, capsys, args, "tests/test_x.py::test_plain\n")
    assert code == 0, err
    assert gc.isenabled()
