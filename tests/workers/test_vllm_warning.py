"""A version the vLLM engine will not serve is named so when it is made (its job's warnings)."""

from __future__ import annotations

import torch

from app.ml.deltas import Delta, DenseUpdate, LowRankUpdate
from workers.execution import _vllm_warnings


def _low(rank: int) -> Delta:
    return Delta({"w": LowRankUpdate(a=torch.ones(rank, 64), b=torch.ones(32, rank))})


def test_a_chain_within_the_servers_rank_gets_no_warning_and_one_above_it_is_named():
    assert _vllm_warnings([_low(8)], max_lora_rank=16) == []
    [warning] = _vllm_warnings([_low(8), _low(16)], max_lora_rank=16)  # the parent's rank counts
    assert "rank 24" in warning and "max_lora_rank 16" in warning and "params.rank" in warning
    [dense] = _vllm_warnings([Delta({"w": DenseUpdate(torch.ones(32, 64))})], max_lora_rank=16)
    assert "rank 32" in dense
