"""Refuse a dist checkpoint whose pickled parts would run code when torch / megatron load them.

    check_dist_checkpoint(ckpt / "model")      # before dist_checkpointing.load(..., ckpt / "model")

A megatron ``torch_dist`` checkpoint folder has three pickled kinds of file, read by libraries we do not control:

* ``.metadata`` — torch.distributed.checkpoint's ``FileSystemReader.read_metadata`` reads it with plain
  ``pickle.load``: a planted file runs arbitrary code. Here it is first read with an unpickler that resolves only
  the classes such a file contains (DCP's metadata dataclasses, ``torch.Size``, dtypes/layouts, ``pathlib`` paths,
  plain containers); anything else is refused, naming the global it asked for.
* ``common.pt`` — megatron ``torch.load``\\ s it with torch's default, which is ``weights_only=True`` since torch 2.6
  unless ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set; it is loaded here with ``weights_only=True`` explicitly.
* ``*.distcp`` — torch's reader loads the byte entries with ``weights_only=True`` itself; tensors are raw bytes.

A file that passes is then loaded by torch/megatron from the same bytes (a process that can rewrite the folder
between this check and the load could still swap it; that needs a live attacker on the filesystem during the job).
Cost: the ``.metadata`` and ``common.pt`` of a checkpoint are kilobytes to a few MB; milliseconds.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

from megatron_s2d.errors import S2DError

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint._extension": {"StreamTransformExtension"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "tuple", "list", "dict", "slice", "bytearray", "complex"},
    "_codecs": {"encode"},  # protocol-2 pickles of bytes
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        import torch

        if module == "torch":
            obj = getattr(torch, name, None)
            if name == "Size" or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        elif name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a checkpoint's metadata never contains")


def check_metadata_file(path: Path) -> None:
    """Unpickle a DCP ``.metadata`` file with the restricted unpickler; S2DError when it is not plain metadata."""
    path = Path(path)
    try:
        _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as e:  # noqa: BLE001 - any failure of the restricted load means: do not let torch load it
        raise S2DError(f"{path}: not loaded, because it is not a plain torch.distributed.checkpoint metadata file "
                       f"({type(e).__name__}: {e}); unpickling it the way torch does could run code from the run "
                       "folder. If you did not plant it, the checkpoint is damaged: delete it (or restore it)") from e


def check_dist_checkpoint(weights_dir: Path) -> None:
    """Raise S2DError if loading the dist checkpoint in ``weights_dir`` could execute code from it."""
    import torch

    weights_dir = Path(weights_dir)
    for meta in sorted(weights_dir.glob("*.metadata")):
        check_metadata_file(meta)
    common = weights_dir / "common.pt"
    if common.is_file():
        try:
            torch.load(common, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise S2DError(f"{common}: not loaded: it is not a weights-only torch file ({type(e).__name__}: "
                           f"{str(e)[:300]}); unpickling it fully could run code from the run folder. If you did not "
                           "plant it, the checkpoint is damaged: delete it (or restore it)") from e
