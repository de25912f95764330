"""io_utils: atomic outputs (mode, failures, leftovers of a killed writer), the one
device choice and worker rule, errors raised as InputError rather than exits, and
hostile folders and paths: 16-bit images, names that are not UTF-8, dangling
links, truncated files, output paths that cannot be written."""
import io
import os
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import image_io
import file_io
import io_utils
from io_utils import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test, then put the old one back."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


# ---------------------------------------------------------------- atomic_output

@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_a_new_output_gets_the_mode_a_plain_open_gives(tmp_path, umask, mask):
    umask(mask)
    plain = tmp_path / "plain.json"
    with open(plain, "w") as f:
        f.write("{}")
    file_io.atomic_write_text(str(tmp_path / "atomic.json"), "{}")
    file_io.atomic_torch_save({"w": torch.zeros(2)}, str(tmp_path / "atomic.pt"))
    assert mode(tmp_path / "atomic.json") == mode(plain) == 0o666 & ~mask
    assert mode(tmp_path / "atomic.pt") == 0o666 & ~mask


@pytest.mark.parametrize("existing", [0o644, 0o640, 0o600])
def test_an_existing_output_keeps_its_mode(tmp_path, umask, existing):
    umask(0o077)  # a plain open would not change an existing file's mode whatever the umask
    target = tmp_path / "pred.csv"
    target.write_text("old\n")
    os.chmod(target, existing)
    file_io.atomic_write_text(str(target), "new\n")
    assert target.read_text() == "new\n"
    assert mode(target) == existing


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out" / "fig.png"
    target.parent.mkdir()
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with file_io.atomic_output(str(target)) as tmp:
            assert os.path.dirname(tmp) == str(target.parent)
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(target.parent)) == ["fig.png"]


def test_atomic_output_creates_the_folder_and_refuses_a_folder(tmp_path):
    with file_io.atomic_output(str(tmp_path / "a" / "b" / "x.txt")) as tmp:
        with open(tmp, "w") as f:
            f.write("x")
    assert (tmp_path / "a" / "b" / "x.txt").read_text() == "x"
    with pytest.raises(InputError, match="is a folder"):
        file_io.atomic_write_text(str(tmp_path / "a"), "x")


def test_a_writer_killed_during_a_save_leaves_a_temporary_the_next_write_removes(tmp_path):
    target = tmp_path / "pred.json"
    target.write_text("old\n")
    writer = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {REPO!r})
        import file_io
        with file_io.atomic_output({str(target)!r}) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    process = subprocess.Popen([sys.executable, "-c", writer])
    assert process.wait() == -9
    [left] = [n for n in os.listdir(tmp_path) if n != "pred.json"]
    assert left.startswith(f".pred.json.{process.pid}.") and left.endswith(".tmp")
    assert target.read_text() == "old\n"
    # a live writer's temporary (this process's) and a dead writer's of another target stay
    live = tmp_path / f".pred.json.{os.getpid()}.abcdefgh.tmp"
    other = tmp_path / f".other.json.{process.pid}.abcdefgh.tmp"
    live.write_text("in progress")
    other.write_text("not ours")

    file_io.atomic_write_text(str(target), "new\n")
    assert target.read_text() == "new\n"
    assert sorted(os.listdir(tmp_path)) == sorted(["pred.json", live.name, other.name])


# ---------------------------------------------------------------- device and workers

def test_pick_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert io_utils.pick_device() == torch.device("cpu")
    assert io_utils.pick_device("cpu") == torch.device("cpu")
    assert io_utils.pick_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(InputError, match="'cuda' was asked for but torch sees no CUDA device"):
        io_utils.pick_device("cuda")
    with pytest.raises(InputError, match="unknown device 'gpu'; expected auto, cpu, cuda or cuda:N"):
        io_utils.pick_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert io_utils.pick_device() == torch.device("cuda")
    assert io_utils.pick_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(InputError, match="'cuda:3' was asked for but torch sees only 1 CUDA device"):
        io_utils.pick_device("cuda:3")


def test_loader_workers(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert io_utils.loader_workers(torch.device("cpu")) == 0
    assert io_utils.loader_workers(torch.device("cuda")) == 12
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert io_utils.loader_workers(torch.device("cuda")) == 7
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert io_utils.loader_workers(torch.device("cuda", 0)) == 1


def test_worker_processes_load_what_the_main_process_loads(tmp_path, monkeypatch, capsys):
    """The loading of the CUDA path (worker processes; pinning is left to CUDA) gives the batches,
    indices and warnings of the CPU path's in-process loading, a broken file included."""
    from torchvision import transforms as T

    for i, (size, mode) in enumerate([((40, 30), "RGB"), ((64, 64), "L"), ((33, 50), "RGBA"), ((80, 20), "P")]):
        _noise(size, mode, seed=i).save(tmp_path / f"{i}.png")
    (tmp_path / "4.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    paths = sorted(str(p) for p in tmp_path.iterdir())
    steps = [T.Compose([T.Resize(24), T.CenterCrop(24), T.ToTensor()]), T.Compose([T.Resize((8, 8)), T.ToTensor()])]

    def load(workers):
        monkeypatch.setattr(image_io, "loader_workers", lambda device: workers)
        batches = list(image_io.readable_batches(paths, steps, 2, torch.device("cpu"), "test", pin_memory=False))
        return batches, capsys.readouterr().err

    (inline, inline_err), (pooled, pooled_err) = load(0), load(2)
    assert [i for i, _ in pooled] == [i for i, _ in inline] == [[0, 1], [2, 3]]
    for (_, a), (_, b) in zip(inline, pooled):
        assert len(a) == len(b) == 2 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert "skipping '4.jpg'" in inline_err and "skipping '4.jpg'" in pooled_err


# ---------------------------------------------------------------- libraries raise, entry points exit

def test_library_errors_are_input_errors_not_exits(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="does not exist"):
        image_io.list_files(str(tmp_path / "absent"))
    with pytest.raises(InputError, match="contains no files"):
        image_io.list_files(str(tmp_path))
    monkeypatch.setenv("HW3_P2_BATCH", "zero")
    with pytest.raises(InputError, match="HW3_P2_BATCH='zero' is not an integer >= 1"):
        io_utils.env_number("HW3_P2_BATCH", io_utils.Range(int, 1))


def test_entry_points_turn_input_errors_into_a_message():
    @io_utils.reports_input_errors
    def main(value):
        if value is None:
            raise InputError("no value")
        return value

    assert main(3) == 3
    with pytest.raises(SystemExit) as exit_info:
        main(None)
    assert exit_info.value.code == "error: no value"


# A folder no user can create files in, root included (sysfs takes no regular files).
READ_ONLY = "/sys"


def gray16(values, mode):
    """A grayscale image of `values` in one of Pillow's 16-bit modes."""
    pixels = np.asarray(values, dtype=np.uint16)
    return Image.fromarray(pixels.astype(np.int32), mode="I") if mode == "I" else Image.fromarray(pixels)


def gray_levels(image):
    rgb = np.asarray(image_io.to_rgb(image))
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    return rgb[..., 0]


@pytest.mark.parametrize("mode", ["I;16", "I"])  # newer Pillow opens 16-bit PNG as I;16, the graders' 9.2 as I
def test_16bit_gray_is_scaled_by_the_format_range_not_by_the_content(mode):
    dim = gray16([[200, 200], [200, 200]], mode)
    with_bright = gray16([[200, 200], [60000, 65535]], mode)
    assert dim.mode == mode
    assert gray_levels(dim).tolist() == [[1, 1], [1, 1]]  # 200 / 65535 of white, whatever else the image holds
    assert gray_levels(with_bright).tolist() == [[1, 1], [233, 255]]
    assert gray_levels(gray16([[257 * 100, 0]], mode)).tolist() == [[100, 0]]


def test_16bit_png_round_trip():
    buffer = io.BytesIO()
    gray16([[0, 200], [32896, 65535]], "I;16").save(buffer, format="PNG")
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
        image.load()
        assert image.mode in image_io.GRAY_WHITE
        assert gray_levels(image).tolist() == [[0, 1], [128, 255]]


def test_list_files_skips_non_utf8_names_and_dangling_links_with_a_warning(tmp_path, capsys):
    Image.new("RGB", (4, 4)).save(tmp_path / "good.png")
    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.png"), "wb") as f:
        f.write((tmp_path / "good.png").read_bytes())
    os.symlink(tmp_path / "nowhere.png", tmp_path / "gone.png")
    (tmp_path / "folder").mkdir()
    assert image_io.list_files(str(tmp_path)) == ["good.png"]
    err = capsys.readouterr().err
    assert "skipping b'caf\\xe9.png': its name is not valid UTF-8" in err
    assert "skipping 'gone.png': a symbolic link to" in err and "nowhere.png" in err
    assert "folder" not in err


def test_is_image_means_it_decodes(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    whole = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "a.txt").write_text("text")
    with Image.open(tmp_path / "cut.jpg"):
        pass  # the header alone reads fine
    assert image_io.is_image(str(tmp_path / "a.jpg"))
    assert not image_io.is_image(str(tmp_path / "cut.jpg"))
    assert not image_io.is_image(str(tmp_path / "a.txt"))


def test_check_output_path_accepts_new_folders_and_existing_files(tmp_path):
    file_io.check_output_path(str(tmp_path / "new" / "deeper" / "pred.csv"))
    (tmp_path / "old.csv").write_text("old")
    file_io.check_output_path(str(tmp_path / "old.csv"))
    assert sorted(os.listdir(tmp_path)) == ["old.csv"]  # nothing created


@pytest.mark.parametrize("case, expected", [
    ("trailing slash", "is a folder; expected a file name"),
    ("folder", "is a folder; expected a file name"),
    ("under a file", "is not a folder"),
    ("read-only place", "cannot create a file in"),
    ("empty", "output path is empty"),
])
def test_check_output_path_refuses(tmp_path, case, expected):
    (tmp_path / "file.txt").write_text("x")
    path = {"trailing slash": str(tmp_path / "newdir") + os.sep, "folder": str(tmp_path),
            "under a file": str(tmp_path / "file.txt" / "sub" / "pred.csv"),
            "read-only place": os.path.join(READ_ONLY, "hw3_outputs", "pred.csv"), "empty": ""}[case]
    if case == "read-only place" and not os.path.isdir(READ_ONLY):
        pytest.skip(f"no {READ_ONLY} here")
    with pytest.raises(io_utils.InputError, match=expected) as error:
        file_io.check_output_path(path)
    assert repr(path) in str(error.value) or not path
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]


@pytest.mark.parametrize("link", ["same", "symlink", "hardlink", "dotted"])
def test_an_output_that_is_an_input_is_refused_however_it_is_spelled(tmp_path, link):
    weights = tmp_path / "decoder_model.bin"
    weights.write_bytes(b"weights")
    out = {"same": weights, "symlink": tmp_path / "link.json", "hardlink": tmp_path / "hard.json",
           "dotted": tmp_path / "." / "sub" / ".." / "decoder_model.bin"}[link]
    (tmp_path / "sub").mkdir()
    if link == "symlink":
        out.symlink_to(weights)
    elif link == "hardlink":
        os.link(weights, out)
    with pytest.raises(InputError, match=r"OUT_JSON .* is the input DECODER_WEIGHTS .*replace that input"):
        file_io.check_outputs_spare_inputs({"OUT_JSON": str(out)}, {"DECODER_WEIGHTS": str(weights)})
    assert weights.read_bytes() == b"weights"


def test_an_output_naming_a_file_in_an_input_folder_is_refused_unless_the_folder_would_not_read_it(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"jpeg")
    (images / "old.json").write_text("{}")
    with pytest.raises(InputError, match=r"the file 'a\.jpg' in it"):
        file_io.check_outputs_spare_inputs({"OUT_JSON": str(images / "a.jpg")}, {"IMG_DIR": str(images)})
    file_io.check_outputs_spare_inputs({"OUT_JSON": str(images / "old.json")}, {"IMG_DIR": str(images)},
                                       reads_member=lambda p: p.endswith(".jpg"))
    file_io.check_outputs_spare_inputs({"OUT_JSON": str(images / "new.json")}, {"IMG_DIR": str(images)})


def test_two_outputs_on_one_file_are_refused(tmp_path):
    a = tmp_path / "a.json"
    a.write_text("{}")
    os.symlink(a, tmp_path / "b.json")
    with pytest.raises(InputError, match="same file as output --metrics-out"):
        file_io.check_outputs_spare_inputs({"--metrics-out": str(a), "--per-image": str(tmp_path / "b.json")}, {})


# ---------------------------------------------------------------- images bounded by what the models see

def _old_open_rgb(path):
    """open_rgb as it was before images were bounded: the reference for ordinary images."""
    with Image.open(path) as image:
        image.load()
        return image_io.to_rgb(image)


def _noise(size, mode="RGB", seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


@pytest.mark.parametrize("size, mode, fmt", [
    ((640, 480), "RGB", "JPEG"), ((500, 375), "RGBA", "PNG"), ((32, 32), "L", "PNG"), ((2048, 1536), "RGB", "JPEG"),
    ((1000, 125), "RGB", "PNG"), ((125, 1000), "P", "PNG"), ((2048, 4096), "RGB", "JPEG"), ((300, 200), "CMYK", "JPEG"),
])
def test_ordinary_images_read_exactly_as_before(tmp_path, size, mode, fmt):
    path = tmp_path / f"a.{fmt.lower()}"
    _noise(size, mode).save(path, format=fmt)
    new, old = image_io.open_rgb(str(path)), _old_open_rgb(str(path))
    assert new.size == old.size == size and new.mode == "RGB"
    assert new.tobytes() == old.tobytes()


def test_a_16bit_image_reads_exactly_as_before(tmp_path):
    gray16([[0, 1000], [40000, 65535]], "I;16").resize((300, 200)).save(tmp_path / "g.png")
    assert image_io.open_rgb(str(tmp_path / "g.png")).tobytes() == _old_open_rgb(str(tmp_path / "g.png")).tobytes()


@pytest.mark.parametrize("size", [(1, 20000), (1, 80000), (20000, 1), (3, 100000), (50, 5000)])
def test_a_strip_is_cropped_to_its_centre_before_any_model_resizes_it(tmp_path, size):
    from torchvision import transforms

    width, height = size
    long = max(size)
    ramp = (np.arange(long) % 251).astype(np.uint8)  # each position along the strip has its own value
    pixels = np.repeat(ramp[:, None], min(size), axis=1) if height > width else np.repeat(ramp[None, :], height, 0)
    Image.fromarray(pixels.reshape(height, width), "L").save(tmp_path / "strip.png")
    image = image_io.open_rgb(str(tmp_path / "strip.png"))
    short = min(size)
    assert min(image.size) == short and max(image.size) == image_io.MAX_ASPECT * short
    start = (long - image_io.MAX_ASPECT * short) // 2
    kept = np.asarray(image)[..., 0].reshape(-1, short if height > width else image.size[0])
    expected = ramp[start:start + image_io.MAX_ASPECT * short]
    assert (kept[:, 0] if height > width else kept[0]).tolist() == expected.tolist()
    # what the encoder's transform makes of it first: bounded by its input size, not by the strip
    resized = transforms.Resize(248)(image)
    assert max(resized.size) <= 248 * image_io.MAX_ASPECT


def test_a_huge_image_is_shrunk_to_a_short_side_of_at_least_safe_side(tmp_path):
    for fmt in ("JPEG", "PNG"):
        path = tmp_path / f"huge.{fmt.lower()}"
        _noise((5000, 3100)).save(path, format=fmt)
        image = image_io.open_rgb(str(path))
        assert image_io.SAFE_SIDE <= min(image.size) <= 2 * image_io.SAFE_SIDE
        assert abs(image.size[0] / image.size[1] - 5000 / 3100) < 0.01


def test_an_image_above_pillows_limit_is_read_downscaled_if_jpeg_else_named_too_large(tmp_path, monkeypatch):
    _noise((400, 300)).save(tmp_path / "bomb.jpg")
    _noise((400, 300)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10000)  # refused above 20000 pixels
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "bomb.jpg")
    image = image_io.open_rgb(str(tmp_path / "bomb.jpg"))
    assert image.size == (100, 75) and image.mode == "RGB"
    assert image_io.is_image(str(tmp_path / "bomb.jpg"))
    with pytest.raises(image_io.ImageTooLarge) as error:
        image_io.open_rgb(str(tmp_path / "bomb.png"))
    message = image_io.image_error(str(tmp_path / "bomb.png"), error.value)
    assert message.startswith("skipping 'bomb.png': too large: 120000 pixels (400 x 300), Pillow's limit is 20000")
    assert "broken" not in message
    assert Image.MAX_IMAGE_PIXELS == 10000  # the guard is back for everyone else
    _, warning = image_io.ReadableImages([str(tmp_path / "bomb.png")], [lambda im: im])[0]
    assert "too large" in warning


def test_process_exists_only_for_a_running_process():
    from file_io import process_exists

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_exists(os.getpid())
    assert not process_exists(child.pid)  # reaped: no such process now
    assert not process_exists(0) and not process_exists(-1)  # os.kill would signal a process group
    assert not process_exists(10 ** 20)  # beyond any pid: OverflowError in os.kill
