"""The exceptions the serving engine raises; the API maps each to one HTTP status."""

from __future__ import annotations


class ServingError(Exception):
    """Base of every error raised on purpose by `app.serving`."""


class UnknownModelError(ServingError):
    """No such model: not `base`, not a live version (unknown or retired), no `latest` yet."""


class ModelLoadError(ServingError):
    """A version's deltas cannot be served: corrupt, made for another base, or not servable."""


class PromptTooLongError(ServingError):
    """The prompt leaves no room for a single new token in the model's context."""


class PromptTooLargeError(ServingError):
    """The prompt is longer than this server takes (`serving_max_prompt_tokens`)."""


class OverloadedError(ServingError):
    """Too many generation requests in progress; the caller should retry shortly."""


class EngineClosedError(ServingError):
    """The engine was shut down; no more requests are taken."""


class InvalidParameterError(ServingError):
    """A request parameter that does not fit the served model (e.g. a logit_bias token id
    beyond its vocabulary); `param` names it."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class EngineUnavailableError(ServingError):
    """The engine that decodes (a vLLM server) does not answer; the caller may retry later."""
