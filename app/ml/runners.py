"""Ways to get logits for fixed sequences while one layer's MLP output projection is tuned.

`PlainRunner` runs the whole model each time. `FastRunner` exploits that nothing below the edited
layer changes: one forward pass records the inputs every layer from the edited one upwards
receives (hidden states, masks, rotary embeddings — whatever that architecture passes), and each
later call replays only those layers and the output head. This works for any architecture whose
decoder layers are called one after another, without knowing their signatures. Where every layer
takes the same arguments besides its hidden states (no per-layer attention types), the recording
pass stops at the edited layer and lends its arguments to the layers above, which are not run
until the first step. It also passes every read of a step through the output head in one call.
`PlainRunner`, the model's own logits one call per read, is the reference the tests hold it to.
"""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from app.ml.disk_cache import content_key, load_tensor, save_tensor
from app.ml.models import LoadedModel
from app.ml.weights_cache import WeightsCache, ids_key

# What a loss reads of one sequence: (index, keep, mask). The last `keep` positions of every row
# of sequence `index`, or with a boolean `mask` [rows, keep] only the selected ones.
Read = tuple[int, int, torch.Tensor | None]


class Runner(Protocol):
    device: torch.device

    def logits(self, index: int, keep: int) -> torch.Tensor:
        """Logits [keep, vocab] of the last `keep` positions of sequence `index`, with gradients
        to the tuned weight. Only the positions a loss reads pay for the (large) output head."""
        ...

    def rows_logits(self, index: int, keep: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [rows, keep, vocab] of every row of a batched sequence `index`; with a boolean
        `mask` [rows, keep], only the selected positions [n, vocab] (the head runs on those)."""
        ...

    def reads_logits(self, reads: list[Read]) -> list[torch.Tensor]:
        """Per read, the logits [n, vocab] of its positions (rows after one another)."""
        ...


def run_layers(model: nn.Module, ids: torch.Tensor) -> None:
    """A no-grad forward pass for the sake of hooks on its layers: the output head, costly with a
    large vocabulary, is applied to one position only."""
    with torch.no_grad():
        try:
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        except TypeError:  # an architecture without `logits_to_keep`
            model(input_ids=ids, use_cache=False)


class PlainRunner:
    def __init__(self, lm: LoadedModel, layer: int, sequences: list[torch.Tensor]):
        self.device = lm.device
        self._model = lm.model
        self._sequences = [ids.to(self.device) for ids in sequences]

    def logits(self, index: int, keep: int) -> torch.Tensor:
        return self.rows_logits(index, keep)[0]

    def rows_logits(self, index: int, keep: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        ids = self._sequences[index]
        try:
            out = self._model(input_ids=ids, use_cache=False, logits_to_keep=keep)
        except TypeError:  # an architecture without `logits_to_keep`: slice afterwards
            out = self._model(input_ids=ids, use_cache=False)
        logits = out.logits[:, -keep:]
        return logits if mask is None else logits[mask]

    def reads_logits(self, reads: list[Read]) -> list[torch.Tensor]:
        return [_flat(self.rows_logits(*read)) for read in reads]


class _LayerCall:
    """One recorded call of a decoder layer, with its hidden-states input left as a hole."""

    def __init__(self, args: tuple, kwargs: dict):
        if args:
            self.hidden, self._args, self._kwargs = args[0], args[1:], kwargs
            self._positional = True
        else:
            self.hidden, self._args = kwargs["hidden_states"], ()
            self._kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            self._positional = False

    def __call__(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self._positional:
            out = layer(hidden, *self._args, **self._kwargs)
        else:
            out = layer(*self._args, hidden_states=hidden, **self._kwargs)
        return out[0] if isinstance(out, tuple) else out

    def same_arguments(self, other: _LayerCall) -> bool:
        """Whether `other` was given the very same objects besides its hidden states."""
        return (
            self._positional == other._positional
            and len(self._args) == len(other._args)
            and all(a is b for a, b in zip(self._args, other._args, strict=True))
            and self._kwargs.keys() == other._kwargs.keys()
            and all(v is other._kwargs[k] for k, v in self._kwargs.items())
        )


class _Recorded(Exception):
    """Ends a recording pass once the only layer it records has been called."""


def _layers_share_arguments(model: nn.Module, layers: list[nn.Module]) -> bool:
    """Whether all of `layers` are called with the same arguments besides their hidden states,
    so that one call's recording serves them all.

    Layers of different attention types (the sliding-window and full layers of Gemma 2, Qwen 2's
    `max_window_layers`...) are given different masks, which a short probe may not show (a mask
    may be left out below the window): the config's `layer_types` or the layers' own
    `attention_type` tell those. Anything else an architecture passes per layer shows in a
    two-token probe, whose calls must hand every layer the very same objects."""
    kinds = getattr(model.config, "layer_types", None)
    if kinds is not None and len(set(kinds)) > 1:
        return False
    if len({getattr(layer, "attention_type", None) for layer in layers}) > 1:
        return False
    probe = torch.zeros((1, 2), dtype=torch.long, device=next(model.parameters()).device)
    calls = _record_calls(model, probe, layers)
    return all(calls[0].same_arguments(call) for call in calls[1:])


def _record_calls(model: nn.Module, ids: torch.Tensor, layers: list[nn.Module]) -> list[_LayerCall]:
    """Each of `layers`' calls in a no-grad pass over `ids`; with one layer, the pass ends there."""
    calls: list[_LayerCall] = []

    def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append(_LayerCall(args, dict(kwargs)))
        if len(layers) == 1:
            raise _Recorded

    hooks = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    try:
        run_layers(model, ids)
    except _Recorded:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    if len(calls) != len(layers):
        raise RuntimeError(f"expected {len(layers)} decoder layer calls, recorded {len(calls)}")
    return calls


# Recordings reused across edits of the same weights, by (layer, device, ids); only sequences the
# caller marks as shared (the retain groups) are kept.
_RECORDINGS: WeightsCache[tuple[torch.Tensor, list[_LayerCall]]] = WeightsCache()


class _DiskInputs:
    """Shared sequences' inputs to the lowest replayed layer, kept on disk (`app.ml.disk_cache`)
    for the next process. Only where every decoder layer takes the same arguments: the first
    layer's are then the lowest replayed one's, and a pass that stops at the first layer gives
    them, so the input is all a recording needs from disk. Keyed by the exact bytes of the weights
    below that layer (hashed once per runner, when first needed) and the ids."""

    def __init__(self, lm: LoadedModel, layer: int, directory: Path):
        self._lm, self._layer, self._directory = lm, layer, directory
        self._weights: str | None = None

    def _key(self, ids: torch.Tensor) -> str:
        if self._weights is None:
            above = list(self._lm.adapter.layers)[self._layer :]
            self._weights = content_key(
                self._lm.model, above, value="layer-input", layer=self._layer,
                device=self._lm.device.type, dtype=str(self._lm.dtype),
            )  # fmt: skip
        digest = hashlib.sha256(f"{self._weights}:{tuple(ids.shape)}:".encode())
        digest.update(ids.to("cpu", torch.int64).contiguous().numpy().tobytes())
        return digest.hexdigest()

    def load(self, ids: torch.Tensor) -> torch.Tensor | None:
        kept = load_tensor(self._directory, self._key(ids))
        if kept is None or kept.ndim != 3 or kept.shape[:2] != ids.shape:
            return None
        return kept.to(device=self._lm.device, dtype=self._lm.dtype)

    def save(self, ids: torch.Tensor, hidden: torch.Tensor) -> None:
        save_tensor(self._directory, self._key(ids), hidden)


class FastRunner:
    """Replays the layers from `layer` upwards: with several edited layers, pass the lowest.

    With `shared=(weights_key, first)`, sequences from index `first` on are recorded once per
    weights key and layer and reused by later edits (`weights_key` taken before any edit hooks),
    and, where the model has a disk cache (`lm.cache_dir`) and every layer takes the same
    arguments, their inputs to `layer` are kept there for later processes."""

    def __init__(
        self,
        lm: LoadedModel,
        layer: int,
        sequences: list[torch.Tensor],
        shared: tuple[tuple, int] | None = None,
    ):
        self.device = lm.device
        self._adapter = lm.adapter
        self._first = lm.adapter.layers[0]
        self._layers = list(lm.adapter.layers)[layer:]
        all_share = _layers_share_arguments(lm.model, list(lm.adapter.layers))
        self._lowest_only = all_share or _layers_share_arguments(lm.model, self._layers)
        disk = None
        if shared is not None and all_share and lm.cache_dir is not None:
            disk = _DiskInputs(lm, layer, lm.cache_dir)
        self._inputs: list[torch.Tensor] = []
        self._calls: list[list[_LayerCall]] = []
        for index, ids in enumerate(sequences):
            if shared is not None and index >= shared[1]:
                name = (layer, str(self.device), ids_key(ids))
                record = partial(self._kept, lm, ids, disk)
                hidden, calls = _RECORDINGS.get(lm.model, shared[0], name, record)
            else:
                hidden, calls = self._kept(lm, ids)
            self._inputs.append(hidden)
            self._calls.append(calls)

    def _kept(
        self, lm: LoadedModel, ids: torch.Tensor, disk: _DiskInputs | None = None
    ) -> tuple[torch.Tensor, list[_LayerCall]]:
        """The edited layer's input and every recorded call; only that input is ever read back,
        so the other layers' hidden states are freed."""
        ids = ids.to(self.device)
        hidden = disk.load(ids) if disk is not None else None
        if hidden is not None:  # the arguments from a pass that stops at the first layer
            call = _record_calls(lm.model, ids, [self._first])[0]
            call.hidden = None
            return hidden, [call] * len(self._layers)
        calls = self._record(lm.model, ids)
        hidden = calls[0].hidden
        for call in calls:
            call.hidden = None
        if disk is not None:
            disk.save(ids, hidden)
        return hidden, calls

    def _record(self, model: nn.Module, ids: torch.Tensor) -> list[_LayerCall]:
        if self._lowest_only:  # one call, lent to every layer above
            return _record_calls(model, ids, self._layers[:1]) * len(self._layers)
        return _record_calls(model, ids, self._layers)

    def logits(self, index: int, keep: int) -> torch.Tensor:
        return self.rows_logits(index, keep)[0]

    def rows_logits(self, index: int, keep: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._adapter.logits_from_hidden(self._hidden(index, keep, mask))

    def reads_logits(self, reads: list[Read]) -> list[torch.Tensor]:
        """One output-head call for all reads: the head's weight (vocabulary x width) is read
        from memory once, not once per read, which on a CPU costs more than its arithmetic."""
        hidden = [_flat(self._hidden(*read)) for read in reads]
        logits = self._adapter.logits_from_hidden(torch.cat(hidden))
        return list(logits.split([h.shape[0] for h in hidden]))

    def _hidden(self, index: int, keep: int, mask: torch.Tensor | None) -> torch.Tensor:
        hidden = self._inputs[index]
        for layer, call in zip(self._layers, self._calls[index], strict=True):
            hidden = call(layer, hidden)
        hidden = hidden[:, -keep:]
        return hidden if mask is None else hidden[mask]


def _flat(values: torch.Tensor) -> torch.Tensor:
    """[rows, keep, d] -> [rows * keep, d]; already flat ([n, d], a masked read) stays so."""
    return values.reshape(-1, values.shape[-1])
