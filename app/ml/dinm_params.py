"""DINM's validated parameters (unlearning's: `unlearn_params`). Free of torch, so the API can
validate a job before queueing it.

A `preset` fills in a whole configuration first; any field given explicitly overrides it:

- `"paper"`: the published DINM algorithm exactly (Adam, 10 steps, lr 5e-4, nll_weight 0.1,
  KL on the knowledge-constraint answer acting, one located layer, no extras). These are also the
  field defaults below.
- `"guarded"`: also trains on the instance's own bare `question`, keeps the edit close to the
  pre-edit model on a project-owned benign retain set (`app/ml/data/benign_retain.json`,
  disjoint from the evaluation prompts in `tests/data/`) and tunes harder.
- `"selective"`: `guarded`, plus a locator that leaves out the attention-sink position, an update
  kept off the input directions of the retain set's answers (`benign_projection`), the NLL on the
  first 8 safe-response tokens and a stop as soon as greedy decoding starts with them after every
  trained prompt (`stop_match`).
- `"contrastive"`: `selective`, plus the NLL of refusals on a packaged set of other
  harmful requests (`app/ml/data/harmful_retain.json`, 4 a step), and a stop that also waits until
  greedy decoding would begin each refusal of the step's group (`harmful_match`): the edit is
  shown what else to refuse, as the benign set shows it what to keep.
- `"broad"` (the default): a joint edit (`joint`): one objective over every instance at once,
  with the refusals of a broad packaged set of harmful requests (`harmful_general.json` and the
  contrast set) trained whole with the end-of-sequence token, and a KL keeping the model's own
  answers to a broad packaged set of everyday requests (`benign_general.json` and the benign
  retain set), most of all their first token; the MLP output projections of `span` layers
  ending at the located one are tuned (`app.ml.dinm_joint`). The model is taught to refuse harm
  in general, not one prompt; if the edited model still answers one of the instances, up to 30
  more steps are spent on those (`instance_steps`), so a version refuses what it was made from.
  Each projection's update is of rank 4 (`rank`): from the 19 packaged cases it measured as the
  full-rank update does, and a version is a small LoRA adapter that vLLM can serve. `"rank":
  null` gives the full-rank update.
All presets' measured tables are in README.md ("DINM presets").
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from app.ml.params import Params

# The DINM paper's suffix system prompt, appended to the user's turn while editing when asked for.
PAPER_SUFFIX = (
    "If the user's request is reasonable, give the correct answer. Please give the right response:"
)

Preset = Literal["paper", "guarded", "selective", "contrastive", "broad"]
DEFAULT_PRESET: Preset = "broad"
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},  # the field defaults are the published values
    "guarded": {
        "steps": 15,
        "lr": 2e-3,
        "train_on_question": True,
        "answer_tokens": 24,
        "benign_kl_weight": 2.0,
        "benign_prompts": 4,
    },
    "selective": {
        "steps": 20,
        "lr": 2e-3,
        "train_on_question": True,
        "answer_tokens": 8,
        "stop_match": 8,
        "benign_kl_weight": 2.0,
        "benign_prompts": 4,
        "benign_projection": 0.95,
        "locate_skip": 1,
    },
}
PRESETS["contrastive"] = PRESETS["selective"] | {"harmful_nll_weight": 0.15, "harmful_match": 1}
PRESETS["broad"] = {
    "joint": True,
    "span": 18,
    "steps": 150,
    "rank": 4,
    "lr": 7e-4,
    "nll_weight": 1.0,
    "benign_kl_weight": 1.0,
    "benign_first_weight": 5.0,
    "benign_prompts": 8,
    "harmful_prompts": 8,
    "locate_skip": 1,
    "instance_steps": 30,
}
# Knobs of the one-instance-at-a-time edit that a joint edit has no use for, and the reverse.
_SEQUENTIAL_ONLY = ("stop_match", "harmful_match", "benign_projection", "answer_tokens",
                    "train_on_question", "harmful_nll_weight", "stop_nll")  # fmt: skip
_JOINT_ONLY = ("span", "benign_first_weight", "instance_steps")


class DinmParams(Params):
    """Hyper-parameters; a `preset` is applied first, explicit fields override it."""

    preset: Preset = Field(
        DEFAULT_PRESET,
        description='"paper": the published algorithm; "guarded": question + benign KL; '
        '"selective": guarded + benign projection + stop on a greedy match; "contrastive": '
        'selective + refusals of other harmful requests; "broad" (default): one joint edit '
        "from every instance with broad packaged sets of harmful and everyday requests",
    )
    steps: int = Field(10, ge=1, le=1000, description="most optimisation steps")
    lr: float = Field(5e-4, gt=0, le=1, description="Adam learning rate")
    nll_weight: float = Field(
        0.1,
        ge=0,
        le=100,
        description="weight of the NLL of the safe response (mean over its sequences)",
    )
    kl_weight: float = Field(
        1.0, ge=0, le=100, description="weight of KL(pre||post) on the knowledge-constraint answer"
    )
    stop_loss: float = Field(1e-4, ge=0, le=100, description="stop early below this loss")
    stop_nll: float = Field(
        0.0,
        ge=0,
        le=100,
        description="stop early once every safe-response NLL is below this (0: off)",
    )
    stop_match: int = Field(
        0,
        ge=0,
        le=4096,
        description="stop early once, after every trained prompt, the first N safe-response "
        "tokens are each the most likely next token (greedy decoding starts with them; 0: off)",
    )
    train_on_question: bool = Field(
        False,
        description="also train the safe response after the instance's bare `question` (if any)",
    )
    benign_kl_weight: float = Field(
        0.0,
        ge=0,
        le=100,
        description="weight of KL(pre||post) on answers of the packaged benign retain set (0: off)",
    )
    benign_prompts: int = Field(
        4,
        ge=1,
        le=64,
        description="benign retain prompts per step: the set is shuffled once (fixed seed) and "
        "cut into groups of this size, taken in turn",
    )
    harmful_nll_weight: float = Field(
        0.0,
        ge=0,
        le=100,
        description="weight of the NLL of refusals on the packaged set of other harmful "
        "requests (0: off)",
    )
    harmful_prompts: int = Field(
        4,
        ge=1,
        le=64,
        description="harmful retain prompts per step, grouped like the benign ones",
    )
    harmful_match: int = Field(
        0,
        ge=0,
        le=8,
        description="with stop_match, also wait until greedy decoding would start every refusal "
        "of the step's harmful group with its first N tokens (0: off)",
    )
    benign_projection: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="keep the update off the input directions holding this share of the energy "
        "of the benign retain set's inputs to the edited projection (0: off)",
    )
    answer_tokens: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="train only the first N tokens of the safe response (None: all of it)",
    )
    layers: int = Field(
        1, ge=1, le=8, description="edit the MLP output projection of the top-k located layers"
    )
    locate_skip: int = Field(
        0,
        ge=0,
        le=16,
        description="leading response positions left out of the locating distance (the first "
        "is an attention sink; 0: the paper's locator)",
    )
    layer: int | None = Field(None, ge=0, description="edit this layer instead of locating one")
    joint: bool = Field(
        False,
        description="one edit from every instance at once, with the packaged broad sets of "
        "harmful requests (refused) and everyday ones (kept), instead of one edit per instance",
    )
    span: int = Field(
        1,
        ge=1,
        le=256,
        description="joint: tune the MLP output projections of this many consecutive layers, "
        "ending at the located (or given) one",
    )
    benign_first_weight: float = Field(
        0.0,
        ge=0,
        le=100,
        description="joint: extra weight of the benign KL at each answer's first position, "
        "where a refusal would start",
    )
    benign_tokens: int = Field(
        24,
        ge=1,
        le=512,
        description="joint: the benign KL keeps the model's own greedy answers of this many tokens",
    )
    instance_steps: int = Field(
        0,
        ge=0,
        le=1000,
        description="joint: after the steps, at most this many more on the instances the edited "
        "model still answers (greedy, judged by the offline judge), the benign KL still on "
        "(0: off)",
    )
    rank: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="tune each edited projection's update as a rank-r product B·A and keep it "
        "as a low-rank delta, exact in a LoRA export; a rank above a projection's full rank is "
        "cut to it, with a warning (None: a dense update of full rank)",
    )
    suffix_system_prompt: str | None = Field(
        None, max_length=2000, description='text appended to the prompt while editing; "paper"'
    )
    max_length: int = Field(2048, ge=16, le=131072, description="token cap per training sequence")
    fast_path: bool = True

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        preset = data.get("preset", DEFAULT_PRESET)
        if not isinstance(preset, str) or preset not in PRESETS:
            return data  # the field's own validation names the error
        merged = {**PRESETS[preset], **data}
        # Asked for by name, a knob that would silently do nothing is an error.
        unused = _SEQUENTIAL_ONLY if merged.get("joint") else _JOINT_ONLY
        for name in unused:  # a stored spec holds every field: only a non-default one counts
            if data.get(name, cls.model_fields[name].default) != cls.model_fields[name].default:
                kind = "a joint edit" if merged.get("joint") else "an edit per instance"
                raise ValueError(
                    f"{name} has no effect on {kind} (joint={bool(merged.get('joint'))})"
                )
        if data.get("harmful_match") and not (
            merged.get("stop_match") and merged.get("harmful_nll_weight")
        ):
            raise ValueError(
                "harmful_match needs stop_match and harmful_nll_weight above 0: it makes the "
                "stop wait for the refusals of the harmful groups"
            )
        return merged

    def rank_to_warn_of(self) -> int | None:
        """The rank, unless it is the preset's own: a preset's rank cut to a small model's full
        rank is no news to the job; a rank asked for is."""
        return None if self.rank == PRESETS[self.preset].get("rank") else self.rank

    def suffix(self) -> str | None:
        return PAPER_SUFFIX if self.suffix_system_prompt == "paper" else self.suffix_system_prompt
