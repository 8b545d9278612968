"""Task vectors and merging them into a base model, all on in-memory state dicts (DeMe Sec. 3.3, Eq. 8).

A task vector is tau_i = theta_i - theta_base over the floating-point tensors of a state dict. Merging builds
theta_merged from theta_base, the tau_i and weights w_i with a method from `MERGE_METHODS` ("linear" is Eq. 8:
theta_base + sum_i w_i tau_i). Integer/bool buffers are never merged: they are taken from the base unchanged.

Weights come in two shapes:
- a flat list of N floats: the same w for every parameter;
- per layer group: `{group_name: [N floats]}` together with `layer_groups={group_name: key_prefix, ...}`
  given when the merger is built, e.g. {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks.",
  "other": ""}. A key belongs to the first group (in mapping order) whose prefix it starts with; the prefix ""
  catches every remaining key. Every floating key must fall in some group, and per-group weights must name
  every group. A flat list is also accepted when layer groups are set (it then applies to all groups).

`TaskVectorMerger` stacks the task vectors once so that each `merge(weights)` (one per search candidate) is a
single memory-bound pass; `merge_task_vectors` is the one-shot functional form. Task vectors can be saved to
safetensors files together with string metadata (timestep range, p, lambda, ...) and the fingerprint of the base
they were computed against; `merge_from_task_vectors` refuses task vectors computed against another base.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from typing import Mapping, Sequence, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ant_ray.files import CorruptFileError, check_safetensors, publishing_file

from .methods import build_merge_method

StateDict = Mapping[str, torch.Tensor]
Weights = Union[Sequence[float], Mapping[str, Sequence[float]]]

TASK_VECTOR_FORMAT = "ant_ray.task_vector/1"
_ALL_KEYS_GROUP = "all"


# --------------------------------------------------------------------------------------------------- fingerprints
def state_dict_fingerprint(state_dict: StateDict) -> str:
    """sha256 (hex) over the sorted keys and, per key, its dtype, shape and raw tensor bytes.

    Independent of the dict's order and of the tensors' device; ~0.1 s for 36M float32 parameters."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key]
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"state_dict[{key!r}] is a {type(tensor).__name__}, not a tensor")
        header = f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode()
        digest.update(len(header).to_bytes(8, "little"))
        digest.update(header)
        digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy())
    return digest.hexdigest()


def check_same_structure(reference: StateDict, other: StateDict, *, name: str, reference_name: str = "base") -> None:
    """ValueError naming the first key that is missing, extra or differently shaped in `other`."""
    missing = [key for key in reference if key not in other]
    if missing:
        raise ValueError(f"{name} lacks key {missing[0]!r} of the {reference_name} state dict "
                         f"({len(missing)} missing); merge only models of the same architecture")
    extra = [key for key in other if key not in reference]
    if extra:
        raise ValueError(f"{name} has key {extra[0]!r} that the {reference_name} state dict lacks ({len(extra)} "
                         f"extra); add the same modules (e.g. channel projections) to the {reference_name} first")
    for key, tensor in reference.items():
        if tuple(other[key].shape) != tuple(tensor.shape):
            raise ValueError(f"{name}[{key!r}] has shape {tuple(other[key].shape)} but the {reference_name} has "
                             f"{tuple(tensor.shape)}")


def _floating_keys(state_dict: StateDict) -> list[str]:
    return [key for key, tensor in state_dict.items() if tensor.is_floating_point()]


# --------------------------------------------------------------------------------------------- task vector files
def compute_task_vector(base_state_dict: StateDict, finetuned_state_dict: StateDict) -> dict[str, torch.Tensor]:
    """tau = finetuned - base for every floating tensor, in the base's dtype and on its device."""
    check_same_structure(base_state_dict, finetuned_state_dict, name="finetuned_state_dict")
    return {
        key: finetuned_state_dict[key].detach().to(device=base.device, dtype=base.dtype) - base.detach()
        for key, base in base_state_dict.items()
        if base.is_floating_point()
    }


def save_task_vector(path: str | os.PathLike, base_state_dict: StateDict, finetuned_state_dict: StateDict,
                     metadata: Mapping[str, object] | None = None) -> dict[str, str]:
    """Write tau = finetuned - base to a safetensors file with string metadata; returns the metadata written.

    `metadata` values become strings: "range" may be (start, end) or "start,end" and is stored as "start,end";
    numbers as str(value); other values as JSON. "base_fingerprint" (of `base_state_dict`) and "format" are
    added; a "base_fingerprint" given by the caller must equal the computed one."""
    base_fingerprint = state_dict_fingerprint(base_state_dict)
    strings = _metadata_strings(metadata or {}, base_fingerprint)
    task_vector = compute_task_vector(base_state_dict, finetuned_state_dict)
    tensors = {key: tensor.contiguous().cpu() for key, tensor in task_vector.items()}
    with publishing_file(path) as temporary:  # `path` never holds half a file
        save_file(tensors, str(temporary), metadata=strings)
    return strings


def load_task_vector(path: str | os.PathLike, *, device: str | torch.device = "cpu"
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tau state dict, metadata) from a file written by `save_task_vector`. A truncated or garbage file is a
    one-line CorruptFileError naming it."""
    fix = "delete it and re-run the pipeline, which writes it again"
    check_safetensors(path, fix=fix)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            metadata = dict(handle.metadata() or {})
            if metadata.get("format") != TASK_VECTOR_FORMAT:
                raise ValueError(f"{path} is not a task vector file written by save_task_vector "
                                 f"(metadata format={metadata.get('format')!r}, expected {TASK_VECTOR_FORMAT!r})")
            task_vector = {key: handle.get_tensor(key) for key in handle.keys()}
    except SafetensorError as error:
        raise CorruptFileError(path, f"cannot be read as safetensors ({error})", fix) from None
    return task_vector, metadata


def task_vector_range(metadata: Mapping[str, str]) -> tuple[int, int]:
    """The timestep range [start, end) recorded in a task vector's metadata as "start,end"."""
    if "range" not in metadata:
        raise ValueError("task vector metadata has no 'range'; save it with metadata={'range': (start, end), ...}")
    return _parse_range(metadata["range"])


def _parse_range(value: object) -> tuple[int, int]:
    parts = value.split(",") if isinstance(value, str) else value
    try:
        start, end = (int(part) for part in parts)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"metadata range must be (start, end) or 'start,end' with integers; got {value!r}") from None
    if not 0 <= start < end:
        raise ValueError(f"metadata range must satisfy 0 <= start < end; got {value!r}")
    return start, end


def _metadata_strings(metadata: Mapping[str, object], base_fingerprint: str) -> dict[str, str]:
    strings: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise ValueError(f"metadata keys must be strings; got {key!r}")
        if key == "range":
            start, end = _parse_range(value)
            strings[key] = f"{start},{end}"
        elif isinstance(value, str):
            strings[key] = value
        elif isinstance(value, numbers.Number):
            strings[key] = str(value)
        else:
            try:
                strings[key] = json.dumps(value, sort_keys=True)
            except TypeError:
                raise ValueError(f"metadata[{key!r}] = {value!r} cannot be stored as a string") from None
    if strings.get("base_fingerprint", base_fingerprint) != base_fingerprint:
        raise ValueError(f"metadata base_fingerprint {strings['base_fingerprint']} differs from the fingerprint "
                         f"{base_fingerprint} of base_state_dict; leave it out, it is computed")
    strings["base_fingerprint"] = base_fingerprint
    strings["format"] = TASK_VECTOR_FORMAT
    return strings


# ----------------------------------------------------------------------------------------------------- merging
class TaskVectorMerger:
    """Holds theta_base and the N task vectors flattened into preallocated buffers; `merge(weights)` is one pass.

    Layout: the floating tensors are flattened into one vector of P entries in a compute dtype (float32, or
    float64 if the base has float64 tensors), ordered by layer group so that each group is one contiguous slice;
    the task vectors form an (N, P) matrix on the base's device. Memory: about (N + 2) * P floats.

    `merge` returns a state dict whose floating tensors are views into one output buffer that the next `merge`
    call overwrites: load it into a model (load_state_dict copies) or pass copy=True before merging again.
    Output dtypes are the base's (a half-precision base is merged in float32 and cast into its own buffers)."""

    def __init__(self, base_state_dict: StateDict, finetuned_state_dicts: Sequence[StateDict], *,
                 method: str = "linear", layer_groups: Mapping[str, str] | None = None, **options: object):
        finetuned = list(finetuned_state_dicts)
        for index, state_dict in enumerate(finetuned):
            check_same_structure(base_state_dict, state_dict, name=f"finetuned_state_dicts[{index}]")
        self._allocate(base_state_dict, len(finetuned), layer_groups)
        for index, state_dict in enumerate(finetuned):
            for key, part in self._slices.items():
                finetuned_flat = state_dict[key].detach().reshape(-1).to(device=self._device, dtype=self._dtype)
                torch.sub(finetuned_flat, self._base_flat[part], out=self._task_vectors[index, part])
        self._finish(method, options)

    @classmethod
    def from_task_vectors(cls, base_state_dict: StateDict, task_vectors: Sequence[StateDict], *,
                          method: str = "linear", layer_groups: Mapping[str, str] | None = None,
                          **options: object) -> "TaskVectorMerger":
        """A merger from task vectors (floating keys of the base only, as `compute_task_vector` returns)."""
        task_vectors = list(task_vectors)
        floating_base = {key: base_state_dict[key] for key in _floating_keys(base_state_dict)}
        for index, task_vector in enumerate(task_vectors):
            check_same_structure(floating_base, task_vector, name=f"task_vectors[{index}]",
                                 reference_name="base's floating-point")
        merger = cls.__new__(cls)
        merger._allocate(base_state_dict, len(task_vectors), layer_groups)
        for index, task_vector in enumerate(task_vectors):
            for key, part in merger._slices.items():
                merger._task_vectors[index, part].copy_(task_vector[key].detach().reshape(-1))
        merger._finish(method, options)
        return merger

    # -- construction
    def _allocate(self, base: StateDict, num_models: int, layer_groups: Mapping[str, str] | None) -> None:
        if num_models < 1:
            raise ValueError("at least one finetuned model / task vector is needed to merge")
        keys = _floating_keys(base)
        if not keys:
            raise ValueError("base_state_dict has no floating-point tensors to merge")
        self.num_models = num_models
        self.layer_groups = _check_layer_groups(layer_groups)
        self.group_names = list(self.layer_groups) if self.layer_groups else [_ALL_KEYS_GROUP]
        group_of_key = {key: _layer_group_index(key, self.layer_groups) for key in keys}
        ordered_keys = sorted(keys, key=group_of_key.__getitem__)  # stable: state-dict order within a group

        self._device = base[keys[0]].device
        self._dtype = torch.float32
        for key in keys:
            self._dtype = torch.promote_types(self._dtype, base[key].dtype)
        self._slices: dict[str, slice] = {}
        group_bounds: dict[int, list[int]] = {}
        offset = 0
        for key in ordered_keys:
            size = base[key].numel()
            self._slices[key] = slice(offset, offset + size)
            bounds = group_bounds.setdefault(group_of_key[key], [offset, offset])
            bounds[1] = offset + size
            offset += size
        self.num_parameters = offset
        self._group_slices = [(group, slice(start, end)) for group, (start, end) in group_bounds.items()]

        self._base_flat = torch.empty(offset, dtype=self._dtype, device=self._device)
        self._out_flat = torch.empty_like(self._base_flat)
        self._task_vectors = torch.empty(num_models, offset, dtype=self._dtype, device=self._device)
        for key, part in self._slices.items():
            self._base_flat[part].copy_(base[key].detach().reshape(-1))

        # Output state dict in the base's key order: views into _out_flat where dtypes agree, own buffers where the
        # base dtype differs from the compute dtype (filled by a cast-copy), and copies of non-floating tensors.
        self._outputs: dict[str, torch.Tensor] = {}
        self._cast_keys: list[str] = []
        for key, tensor in base.items():
            if key not in self._slices:
                self._outputs[key] = tensor.detach().clone()
            elif tensor.dtype == self._dtype:
                self._outputs[key] = self._out_flat[self._slices[key]].view(tensor.shape)
            else:
                self._outputs[key] = torch.empty(tensor.shape, dtype=tensor.dtype, device=self._device)
                self._cast_keys.append(key)

    def _finish(self, method: str, options: Mapping[str, object]) -> None:
        self.method = method
        self._method = build_merge_method(method, **options)
        self._method.prepare(self._task_vectors, list(self._slices.values()))

    # -- merging
    def merge(self, weights: Weights, *, copy: bool = False) -> dict[str, torch.Tensor]:
        """The merged state dict for `weights` (a list of N floats, or {group: [N floats]} with layer groups)."""
        per_group = self._weights_per_group(weights)
        for group, part in self._group_slices:
            self._method.combine(self._base_flat[part], self._task_vectors[:, part], per_group[group],
                                 self._out_flat[part])
        for key in self._cast_keys:
            self._outputs[key].copy_(self._out_flat[self._slices[key]].view(self._outputs[key].shape))
        if copy:
            return {key: tensor.clone() for key, tensor in self._outputs.items()}
        return dict(self._outputs)

    def _weights_per_group(self, weights: Weights) -> torch.Tensor:
        if isinstance(weights, Mapping):
            if self.layer_groups is None:
                raise ValueError("weights is a dict of per-layer-group weights but the merger has no layer_groups; "
                                 "pass layer_groups={group: key_prefix, ...} or give weights as a list of "
                                 f"{self.num_models} floats")
            missing = [name for name in self.group_names if name not in weights]
            extra = [name for name in weights if name not in self.layer_groups]
            if missing or extra:
                raise ValueError(f"weights must name exactly the layer groups {self.group_names}; "
                                 f"missing {missing}, unknown {extra}")
            rows = [_weight_vector(weights[name], self.num_models, f"weights[{name!r}]") for name in self.group_names]
        else:
            rows = [_weight_vector(weights, self.num_models, "weights")] * len(self.group_names)
        return torch.tensor(rows, dtype=self._dtype, device=self._device)


def merge_task_vectors(base_state_dict: StateDict, finetuned_state_dicts: Sequence[StateDict], weights: Weights, *,
                       method: str = "linear", layer_groups: Mapping[str, str] | None = None,
                       **options: object) -> dict[str, torch.Tensor]:
    """One merge: method "linear" gives base + sum_i w_i (finetuned_i - base) (DeMe Eq. 8).

    For many weight candidates build one `TaskVectorMerger` instead (it computes the task vectors once)."""
    merger = TaskVectorMerger(base_state_dict, finetuned_state_dicts, method=method, layer_groups=layer_groups,
                              **options)
    return merger.merge(weights)


def merge_from_task_vectors(base_state_dict: StateDict,
                            task_vectors: Sequence[tuple[StateDict, Mapping[str, str]]], weights: Weights, *,
                            method: str = "linear", layer_groups: Mapping[str, str] | None = None,
                            **options: object) -> dict[str, torch.Tensor]:
    """Merge (tau, metadata) pairs as returned by `load_task_vector` into `base_state_dict`.

    Refuses (ValueError naming both fingerprints) a task vector whose metadata base_fingerprint is missing or
    differs from the fingerprint of `base_state_dict`: adding it to another base would be silently wrong."""
    base_fingerprint = state_dict_fingerprint(base_state_dict)
    taus = []
    for index, item in enumerate(task_vectors):
        try:
            task_vector, metadata = item
        except (TypeError, ValueError):
            raise ValueError(f"task_vectors[{index}] must be a (task vector, metadata) pair as load_task_vector "
                             "returns") from None
        if not isinstance(metadata, Mapping):
            raise ValueError(f"task_vectors[{index}] metadata must be a mapping of strings; got {type(metadata)}")
        recorded = metadata.get("base_fingerprint")
        if recorded != base_fingerprint:
            raise ValueError(f"task_vectors[{index}] (range {metadata.get('range', '?')}) was computed against a "
                             f"base with fingerprint {recorded} but base_state_dict has fingerprint "
                             f"{base_fingerprint}; merge it into the base it was finetuned from")
        taus.append(task_vector)
    merger = TaskVectorMerger.from_task_vectors(base_state_dict, taus, method=method, layer_groups=layer_groups,
                                                **options)
    return merger.merge(weights)


# ----------------------------------------------------------------------------------------------- weights/groups
def _check_layer_groups(layer_groups: Mapping[str, str] | None) -> dict[str, str] | None:
    if layer_groups is None:
        return None
    if not isinstance(layer_groups, Mapping) or not layer_groups:
        raise ValueError("layer_groups must be a non-empty mapping {group_name: key_prefix}, e.g. "
                         "{'down': 'down_blocks.', 'mid': 'mid_block.', 'up': 'up_blocks.', 'other': ''}")
    for name, prefix in layer_groups.items():
        if not isinstance(name, str) or not isinstance(prefix, str):
            raise ValueError(f"layer_groups entries must be str -> str prefixes; got {name!r}: {prefix!r}")
    return dict(layer_groups)


def _layer_group_index(key: str, layer_groups: Mapping[str, str] | None) -> int:
    if layer_groups is None:
        return 0
    for index, prefix in enumerate(layer_groups.values()):
        if key.startswith(prefix):
            return index
    raise ValueError(f"parameter {key!r} matches no prefix in layer_groups {dict(layer_groups)}; add a catch-all "
                     "group with prefix '' (e.g. 'other': '')")


def _weight_vector(values: object, num_models: int, name: str) -> list[float]:
    if isinstance(values, (str, bytes)) or isinstance(values, Mapping):
        raise ValueError(f"{name} must be a list of {num_models} floats; got {values!r}")
    try:
        floats = [float(value) for value in values]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of {num_models} floats; got {values!r}") from None
    if len(floats) != num_models:
        raise ValueError(f"{name} has {len(floats)} entries but there are {num_models} finetuned models")
    if not all(math.isfinite(value) for value in floats):
        raise ValueError(f"{name} must be finite; got {floats}")
    return floats
