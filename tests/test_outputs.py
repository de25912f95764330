"""file_io's atomic outputs on hostile paths (issue 22, section 2): an output that is a symbolic
link is written through, temporaries fit NAME_MAX whatever the output's name, the cleanup of
stale temporaries never fails a run, and a full disk is one line naming the device, the path
and the size, with the previous file kept."""
import errno
import os
import subprocess
import sys
import textwrap

import pytest

import file_io
from io_utils import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- symbolic links

def test_an_output_that_is_a_symlink_is_written_through(tmp_path):
    target = tmp_path / "real" / "pred.json"
    target.parent.mkdir()
    target.write_text("old\n")
    os.chmod(target, 0o640)
    link = tmp_path / "pred.json"
    link.symlink_to(target)
    file_io.atomic_write_text(str(link), "new\n")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new\n"
    assert os.stat(target).st_mode & 0o777 == 0o640
    assert sorted(os.listdir(target.parent)) == ["pred.json"]


def test_a_chain_of_links_and_a_dangling_link_are_written_through(tmp_path):
    target = tmp_path / "target.csv"
    (tmp_path / "first").symlink_to(tmp_path / "second")
    (tmp_path / "second").symlink_to(target)  # dangling until written, as open(path, "w") would create it
    file_io.atomic_write_text(str(tmp_path / "first"), "a,b\n")
    assert target.read_text() == "a,b\n"
    assert (tmp_path / "first").is_symlink() and (tmp_path / "second").is_symlink()


def test_a_symlink_to_a_folder_is_refused(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "folder")
    with pytest.raises(InputError, match="is a folder"):
        file_io.atomic_write_text(str(tmp_path / "link"), "x")


# ---------------------------------------------------------------- long names

LONG_NAMES = [
    "a" * 245 + ".json",  # 250 bytes
    "é" * 122 + "x.json",  # 250 bytes, 2 bytes a character
    "字" * 81 + "a.csv",  # 248 bytes, 3 bytes a character
    "a" * 255,  # the longest name there is
]


@pytest.mark.parametrize("name", LONG_NAMES, ids=["ascii250", "utf8x2", "utf8x3", "ascii255"])
def test_a_long_output_name_gets_a_temporary_within_name_max(tmp_path, name):
    path = tmp_path / name
    limit = file_io.name_max(str(tmp_path))
    assert len(os.fsencode(name)) <= limit
    file_io.check_output_path(str(path))
    with file_io.atomic_output(str(path)) as tmp:
        assert len(os.fsencode(os.path.basename(tmp))) <= limit
        with open(tmp, "w") as f:
            f.write("x")
    assert path.read_text() == "x"
    assert os.listdir(tmp_path) == [name]


@pytest.mark.parametrize("name", LONG_NAMES, ids=["ascii250", "utf8x2", "utf8x3", "ascii255"])
def test_a_long_names_stale_temporary_is_found_and_another_long_names_is_not(tmp_path, name):
    path = tmp_path / name
    dead = _dead_pid()
    stale = tmp_path / (file_io._tmp_prefix(str(path), dead) + "abcdefgh.tmp")
    stale.write_text("half")
    sibling = name[:-6] + "другой"  # the same long start, another name
    other = tmp_path / (file_io._tmp_prefix(str(tmp_path / sibling), dead) + "abcdefgh.tmp")
    other.write_text("not ours")
    assert file_io.remove_stale_temporaries(str(path)) == [str(stale)]
    assert other.exists()


def test_an_output_name_beyond_name_max_fails_before_any_work(tmp_path):
    with pytest.raises(InputError, match="256 bytes long; the file system takes at most 255"):
        file_io.check_output_path(str(tmp_path / ("a" * 256)))


# ---------------------------------------------------------------- outputs among themselves

@pytest.mark.parametrize("second", ["real/out.json", "real/./out.json", "real/sub/../out.json", "linked/out.json",
                                    "real/dangling"])
def test_two_outputs_that_do_not_exist_yet_are_the_same_file_when_they_resolve_alike(tmp_path, second):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "sub").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "real", target_is_directory=True)
    (tmp_path / "real" / "dangling").symlink_to(tmp_path / "real" / "out.json")
    first = tmp_path / "real" / "out.json"
    with pytest.raises(InputError, match="is the same file as output A .*give each output its own path"):
        file_io.check_outputs_spare_inputs({"A": str(first), "B": str(tmp_path / second)}, {})
    with pytest.raises(InputError, match="is the same file as output A"):
        file_io.check_outputs_spare_inputs({"A": str(tmp_path / "linked" / "out.json"),
                                            "B": str(tmp_path / second)}, {})
    file_io.check_outputs_spare_inputs({"A": str(first), "B": str(tmp_path / "real" / "other.json")}, {})
    assert not first.exists()


@pytest.mark.parametrize("bad", ["a" * 256, "folder/", "a_file/below.json"])
def test_every_output_is_checked_as_a_path_too_and_named_by_its_label(tmp_path, bad):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(InputError, match=r"^figure of x: "):
        file_io.check_outputs_spare_inputs({"OUT": str(tmp_path / "ok.json"), "figure of x": f"{tmp_path}/{bad}"}, {})
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


# ---------------------------------------------------------------- stale temporaries

def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("stray", [
    ".pred.json.99999999999999999999.abc.tmp",  # the issue's: OverflowError from os.kill
    ".pred.json.99999999999999999999.abcdefgh.tmp",
    ".pred.json.0.abcdefgh.tmp",  # pid 0 is the process group, not a writer
    ".pred.json.-1.abcdefgh.tmp",
    ".pred.json.12x.abcdefgh.tmp",
    ".pred.json..tmp",
    ".pred.json.DEAD.abcdefgh.tmp",
    ".pred.json.1.ABCDEFGH.tmp",  # tempfile's random part is lower case
    ".pred.json.1.abcdefgh.extra.tmp",
    ".pred.json.١٢٣.abcdefgh.tmp",  # Arabic-Indic digits: str.isdigit says yes, int() takes them
])
def test_cleanup_leaves_files_that_are_not_exactly_ours_and_never_fails(tmp_path, stray):
    target = tmp_path / "pred.json"
    (tmp_path / stray).write_text("someone's")
    file_io.atomic_write_text(str(target), "{}\n")
    assert target.read_text() == "{}\n"
    assert (tmp_path / stray).read_text() == "someone's"


def test_cleanup_leaves_a_folder_or_a_link_named_like_a_temporary(tmp_path):
    dead = _dead_pid()
    folder = tmp_path / f".pred.json.{dead}.abcdefgh.tmp"
    folder.mkdir()
    link = tmp_path / f".pred.json.{dead}.abcdefg1.tmp"
    link.symlink_to(tmp_path / "elsewhere")
    file_io.atomic_write_text(str(tmp_path / "pred.json"), "{}\n")
    assert folder.is_dir() and link.is_symlink()


def test_cleanup_errors_are_swallowed(tmp_path, monkeypatch):
    dead = _dead_pid()
    (tmp_path / f".pred.json.{dead}.abcdefgh.tmp").write_text("half")

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EPERM, "not yours")

    monkeypatch.setattr(file_io.os, "unlink", refuse)
    assert file_io.remove_stale_temporaries(str(tmp_path / "pred.json")) == []
    monkeypatch.setattr(file_io.os, "listdir", refuse)
    assert file_io.remove_stale_temporaries(str(tmp_path / "pred.json")) == []


def test_a_stray_temporary_does_not_fail_a_graders_script_write(tmp_path):
    """The issue's case end to end in a fresh process: the write after all the work succeeds."""
    (tmp_path / ".pred.json.99999999999999999999.abc.tmp").write_text("stray")
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {REPO!r})
        import file_io
        file_io.atomic_write_text({str(tmp_path / 'pred.json')!r}, "{{}}\\n")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "pred.json").read_text() == "{}\n"


# ---------------------------------------------------------------- a full disk

def _fail_writes(monkeypatch, code):
    """Every write to a temporary of ours raises OSError(code) once some bytes are in."""
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:10])
            self.f.flush()
            raise OSError(code, os.strerror(code))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode and str(path).endswith(file_io.TMP_SUFFIX):
            return Full(f)
        return f

    monkeypatch.setattr("builtins.open", fake_open)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_one_line_naming_device_path_and_size_and_keeps_the_old_file(tmp_path, monkeypatch, code):
    target = tmp_path / "pred.json"
    target.write_text("old\n")
    _fail_writes(monkeypatch, code)
    text = "x" * (3 * 2**20 + 1)
    with pytest.raises(InputError) as error:
        file_io.atomic_write_text(str(target), text)
    message = str(error.value)
    assert "\n" not in message
    assert "no space left on " in message and f" writing {target} (4 MB needed)" in message
    monkeypatch.undo()
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["pred.json"]


def test_a_full_disk_of_unknown_size_says_what_the_temporary_held(tmp_path, monkeypatch):
    target = tmp_path / "fig.png"
    with pytest.raises(InputError, match=r"no space left on .* writing .*fig\.png \(1 MB needed\)$"):
        with file_io.atomic_output(str(target)) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
    assert os.listdir(tmp_path) == []


def test_other_os_errors_pass_unchanged(tmp_path):
    with pytest.raises(PermissionError):
        with file_io.atomic_output(str(tmp_path / "x")):
            raise PermissionError(errno.EACCES, "no")
