"""weights.torch_load, the one reader of weight files: a file torch.save did not write says what it is."""
import pytest
import torch

from weights import torch_load


@pytest.mark.parametrize("content, what", [
    (b"", "it is empty"),
    (b"hello world\n", "it is text starting with 'hello world'"),
    (b"\n  <!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title>", "it is an HTML page"),
    (b"PK\x03\x04 not really a zip archive", "damaged or truncated"),
    (bytes(range(1, 40)) + b"\xff\0", "neither a zip archive nor a pickle"),
])
def test_files_torch_did_not_write(tmp_path, content, what):
    path = tmp_path / "weights.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError) as error:
        torch_load(str(path))
    message = str(error.value)
    assert message.startswith(f"{path} is not a PyTorch weights file (") and what in message
    assert "weights_only" not in message  # never torch's advice to load untrusted pickles


def test_a_truncated_weights_file(tmp_path):
    torch.save({"w": torch.arange(10000.0)}, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut.pt is not a PyTorch weights file \(damaged or truncated"):
        torch_load(str(tmp_path / "cut.pt"))


class NotWeights:
    """Any class: a weights-only load refuses to import it."""


@pytest.mark.skipif("weights_only" not in torch.load.__code__.co_varnames, reason="torch < 1.13 loads any pickle")
def test_objects_that_are_not_weights(tmp_path):
    torch.save({"w": torch.zeros(2), "extra": NotWeights()}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="holds objects other than tensors and plain containers"):
        torch_load(str(tmp_path / "odd.pt"))


def test_weights_and_missing_files(tmp_path):
    state = {"w": torch.arange(6.0).view(2, 3), "nested": {"b": torch.ones(1)}, "n": 3}
    torch.save(state, tmp_path / "ok.pt")
    loaded = torch_load(str(tmp_path / "ok.pt"))
    assert torch.equal(loaded["w"], state["w"]) and loaded["n"] == 3
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(torch_load(str(tmp_path / "legacy.pt"))["nested"]["b"], torch.ones(1))
    with pytest.raises(FileNotFoundError):
        torch_load(str(tmp_path / "absent.pt"))
