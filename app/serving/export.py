"""A version's exports, built with the base model the serving engine already holds.

The version's chain is read through the engine's version source (checksums and base verified, as
for serving); `app.ml.export` turns it into a folder or a file:
- The SVDs, the merged tensors and the summed delta run on the engine's
  compute thread (`Engine.compute`), between batches, like a version load: that thread stays the
  only one doing torch math in this process.
- The live weights are never written: the engine serves versions through hooks, and an export
  computes new tensors for the edited parameters only. Generations running meanwhile see exactly
  what they saw before. A merged model is written from the live tensors on a thread of its own
  that ends with the write (file I/O only), so a long write does not hold up decoding.
- One export at a time per process (a lock): the extra memory is that of one export, i.e. its
  edited parameters and one shard of a merged model being written.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.chains import chain_deltas
from app.ml import export as ml_export
from app.serving.engine import on_passing_thread

if TYPE_CHECKING:
    from app.serving.engine_base import EngineBase as Engine

FORMATS = ("peft", "merged", "delta")
_ONE_AT_A_TIME = threading.Lock()


@dataclass(frozen=True)
class Export:
    path: Path  # the folder (peft, merged) or the file (delta)
    report: dict[str, Any]  # what the export records about itself (detox_export.json)


def export_version(
    engine: Engine,
    *,
    fmt: str,
    version: str,
    version_id: int,
    out: Path,
    max_rel_error: float = ml_export.DEFAULT_MAX_REL_ERROR,
    max_rank: int | None = None,
) -> Export:
    """Write version `version` (row `version_id`, retired or not, with its whole chain) as `fmt`
    under the empty folder `out`.

    Raises `app.ml.errors` (ExportError and subclasses, DeltaError, FingerprintMismatchError) and
    `app.serving.errors` (ModelLoadError for a corrupt or foreign chain, EngineClosedError)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}")
    ml_export.check_bounds(max_rel_error=max_rel_error, max_rank=max_rank)
    lm = engine.lm
    chain = engine.source.load_chain(version_id)
    meta: dict[str, Any] = {
        "version": version,
        "chain": [{"name": link.name, "sha256": link.sha256} for link in chain],
        "base_model": lm.name,
    }
    deltas = chain_deltas(chain)

    with _ONE_AT_A_TIME:
        if fmt == "peft":

            def adapter() -> ml_export.AdapterReport:
                return ml_export.save_peft_adapter(
                    lm.model, deltas, out, base_model_name_or_path=lm.name,
                    max_rel_error=max_rel_error, max_rank=max_rank, metadata=meta,
                )  # fmt: skip

            report = engine.compute(adapter)
            return Export(out, {**meta, **report.to_json()})
        if fmt == "merged":
            merged = engine.compute(lambda: ml_export.merged_weights(lm.model, deltas))
            on_passing_thread(
                lambda: ml_export.save_merged(lm.model, lm.tokenizer, merged, out, metadata=meta)
            )
            return Export(out, {"format": ml_export.MERGED_FORMAT, **meta})
        delta_meta = {
            "model": lm.name,
            "detox.version": version,
            "detox.chain": json.dumps(meta["chain"]),
        }
        data = engine.compute(
            lambda: ml_export.summed_delta(lm.model, deltas, meta=delta_meta).to_bytes()
        )
        path = out / f"{version}.delta.safetensors"
        path.write_bytes(data)
        return Export(path, meta)
