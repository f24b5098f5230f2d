"""Ways to get logits for fixed sequences while one layer's MLP output projection is tuned.

`PlainRunner` runs the whole model each time. `FastRunner` exploits that nothing below the edited
layer changes: one full forward pass records the inputs every layer from the edited one upwards
receives (hidden states, masks, rotary embeddings — whatever that architecture passes), and each
later call replays only those layers and the output head. This works for any architecture whose
decoder layers are called one after another, without knowing their signatures.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from app.ml.models import LoadedModel


class Runner(Protocol):
    device: torch.device

    def logits(self, index: int, keep: int) -> torch.Tensor:
        """Logits [keep, vocab] of the last `keep` positions of sequence `index`, with gradients
        to the tuned weight. Only the positions a loss reads pay for the (large) output head."""
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
        ids = self._sequences[index]
        try:
            out = self._model(input_ids=ids, use_cache=False, logits_to_keep=keep)
        except TypeError:  # an architecture without `logits_to_keep`: slice afterwards
            out = self._model(input_ids=ids, use_cache=False)
        return out.logits[0, -keep:]


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


class FastRunner:
    def __init__(self, lm: LoadedModel, layer: int, sequences: list[torch.Tensor]):
        self.device = lm.device
        self._adapter = lm.adapter
        self._layers = list(lm.adapter.layers)[layer:]
        self._calls = [self._record(lm.model, ids.to(self.device)) for ids in sequences]
        # Only the edited layer's input is ever read back: free the others' hidden states.
        self._inputs = [calls[0].hidden for calls in self._calls]
        for calls in self._calls:
            for call in calls:
                call.hidden = None

    def _record(self, model: nn.Module, ids: torch.Tensor) -> list[_LayerCall]:
        calls: list[_LayerCall] = []

        def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.append(_LayerCall(args, dict(kwargs)))

        hooks = [
            layer.register_forward_pre_hook(record, with_kwargs=True) for layer in self._layers
        ]
        try:
            run_layers(model, ids)
        finally:
            for hook in hooks:
                hook.remove()
        if len(calls) != len(self._layers):
            raise RuntimeError(
                f"expected {len(self._layers)} decoder layer calls, recorded {len(calls)}"
            )
        return calls

    def logits(self, index: int, keep: int) -> torch.Tensor:
        hidden = self._inputs[index]
        for layer, call in zip(self._layers, self._calls[index], strict=True):
            hidden = call(layer, hidden)
        return self._adapter.logits_from_hidden(hidden[:, -keep:])[0]
