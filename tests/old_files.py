"""Files written by captioner 0.1 and 0.2 themselves, frozen in tests/fixtures/old/<version>/ by
scripts/old_fixtures.py, and put back together exactly as that version wrote them.

The frozen encoder (a ResNet18 with random weights seeded as every version seeds it) is left out of the fixtures:
45 MB that torchvision rebuilds from the seed. Each left-out tensor is recorded with the SHA-256 of its bytes, so
what is put back is checked to be what the old version wrote, byte for byte:

    checkpoint.pt      the checkpoint, without its `encoder.*` tensors (rebuilt from the seeded network)
    export/            0.2's exported folder, its encoder.onnx without the initializers' bytes (rebuilt from an
                       ONNX export of the same seeded network: the folded convolution weights are the same bytes)
    frozen.json        the commit, what was left out, and the captions that version gave
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torchvision

OLD = Path(__file__).parent / "fixtures" / "old"
ENCODER_GRAPH = "encoder.onnx"


def digest(data: bytes) -> str:
    """SHA-256 of `data`, hex."""
    return hashlib.sha256(data).hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes, hex."""
    return digest(tensor.detach().cpu().contiguous().numpy().tobytes())


def seeded_encoder(frozen: dict[str, Any]) -> torch.nn.Module:
    """The frozen encoder every version built: a torchvision network with random weights under a seed, no head."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(frozen["encoder"]["seed"])
        network = torchvision.models.get_model(frozen["encoder"]["torchvision"], weights=None)
    network.fc = torch.nn.Identity()
    return network.eval()


def encoder_graph_tensors(frozen: dict[str, Any]) -> dict[str, bytes]:
    """The initializers' bytes of the seeded encoder exported to ONNX, by their SHA-256 (the exporter folds each
    batch norm into its convolution, as the old exports did)."""
    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice: the old versions used it
        torch.onnx.export(seeded_encoder(frozen), (torch.zeros(1, 3, 32, 32),), buffer, dynamo=False, opset_version=17)
    graph = onnx.load_from_string(buffer.getvalue()).graph
    return {digest(tensor.raw_data): tensor.raw_data for tensor in graph.initializer}


def strip_encoder_graph(path: Path, frozen: dict[str, Any]) -> dict[str, str]:
    """Empty, in place, the initializers of the ONNX graph at `path` that the seeded encoder rebuilds; returns each
    emptied initializer's name and the SHA-256 of its bytes."""
    import onnx

    rebuildable = encoder_graph_tensors(frozen)
    graph = onnx.load(str(path))
    left_out = {}
    for tensor in graph.graph.initializer:
        if digest(tensor.raw_data) in rebuildable:
            left_out[tensor.name] = digest(tensor.raw_data)
            tensor.raw_data = b""
    onnx.save(graph, str(path))
    return left_out


def rebuilt_checkpoint(fixture: Path) -> dict[str, Any]:
    """The checkpoint as that version wrote it: its frozen encoder's tensors put back, each checked against the
    digest of the tensor written."""
    frozen = json.loads((fixture / "frozen.json").read_text())
    checkpoint = torch.load(fixture / "checkpoint.pt", map_location="cpu", weights_only=False)
    tensors = {f"encoder.net.{name}": tensor for name, tensor in seeded_encoder(frozen).state_dict().items()}
    assert set(tensors) == set(frozen["left_out"])
    for name, expected in frozen["left_out"].items():
        tensor = tensors[name]
        assert [list(tensor.shape), str(tensor.dtype)] == [expected["shape"], expected["dtype"]], name
        assert tensor_digest(tensor) == expected["sha256"], name
    checkpoint["state_dict"].update(tensors)
    return checkpoint


def rebuilt_export(fixture: Path, folder: Path) -> Path:
    """The exported folder as that version wrote it, in `folder`: the encoder graph's initializers put back, each
    checked against its digest (so the graph's own digest in the manifest holds again)."""
    import onnx

    frozen = json.loads((fixture / "frozen.json").read_text())
    shutil.copytree(fixture / "export", folder)
    tensors = encoder_graph_tensors(frozen)
    graph = onnx.load(str(folder / ENCODER_GRAPH))
    left_out = frozen["export"]["left_out"]
    for tensor in graph.graph.initializer:
        if tensor.name in left_out:
            assert left_out[tensor.name] in tensors, f"{tensor.name}: the seeded encoder no longer gives its bytes"
            tensor.raw_data = tensors[left_out[tensor.name]]
    onnx.save(graph, str(folder / ENCODER_GRAPH))
    return folder
