"""/healthz (the process answers) and /readyz (database, broker, model and generation engine are
usable; under `detox up` also its worker process)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.api.deps import BrokerDep, SettingsDep
from app.api.errors import UNAVAILABLE, error_response
from app.api.model_info import model_folder, model_name
from app.api.schemas import CheckResult, Readiness
from app.serving.dtype import describe as describe_dtype
from app.serving.vllm_health import vllm_problem
from app.settings import Settings
from app.store.db import ping

if TYPE_CHECKING:
    from app.serving.engine_base import EngineBase

router = APIRouter(tags=["health"])
BROKER_TIMEOUT_S = 2.0


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"description": "not ready: the envelope plus `checks`"}},
)
def readyz(request: Request, settings: SettingsDep, broker: BrokerDep) -> JSONResponse:
    checks = {
        "database": _check(lambda: ping(request.app.state.engine), "reachable"),
        "broker": _check(lambda: broker.ping(BROKER_TIMEOUT_S), "reachable"),
        "model": model_check(settings),
        "engine": engine_check(settings, _loaded_engine(request)),
    }
    worker_check = getattr(request.app.state, "worker_check", None)
    if worker_check is not None:  # `detox up`: its own worker, restarted when it dies
        checks["worker"] = worker_check()
    body = {name: check.model_dump() for name, check in checks.items()}
    failed = [name for name, check in checks.items() if not check.ok]
    if not failed:
        return JSONResponse({"status": "ready", "checks": body})
    reasons = "; ".join(f"{name}: {checks[name].detail}" for name in failed)
    return error_response(
        503, f"not ready: {reasons}", UNAVAILABLE, code="not_ready", extra={"checks": body}
    )


def _check(probe: Callable[[], object], ok_detail: str) -> CheckResult:
    try:
        probe()
    except Exception as exc:
        detail = f"{type(exc).__name__}: {exc}".strip()
        return CheckResult(ok=False, detail=detail.splitlines()[0][:300])
    return CheckResult(ok=True, detail=ok_detail)


def _loaded_engine(request: Request) -> EngineBase | None:
    serving = getattr(request.app.state, "serving", None)
    return serving.engine_if_loaded() if serving is not None else None


def engine_check(settings: Settings, loaded: EngineBase | None = None) -> CheckResult:
    """Which engine decodes generations and how (batching, weights' dtype), and, for vLLM,
    whether it answers (jobs and versions do not need it, but generation does)."""
    if settings.engine == "builtin":
        if loaded is not None:
            return CheckResult(ok=True, detail=f"builtin: {loaded.health().detail}")
        weights = describe_dtype(settings.serving_dtype, settings.device)
        return CheckResult(
            ok=True,
            detail=f"builtin: decoding in the API process (model not loaded yet): "
            f"{settings.serving_batching} batching, {weights}",
        )
    problem = vllm_problem(settings.vllm_url)
    return CheckResult(ok=problem is None, detail=problem or f"vllm at {settings.vllm_url}")


def model_check(settings: Settings) -> CheckResult:
    """The configured model can be loaded by a worker: no loading here, only where it comes from.
    The answer (which needs no key) names the model, never a path of this machine."""
    model = settings.model
    name = model_name(settings)
    if model == "demo":
        folder = model_folder(settings)
        if folder is not None and (folder / "config.json").is_file():
            return CheckResult(ok=True, detail=f"demo model {name}, converted")
        missing = [m for m in ("gguf", "pip") if importlib.util.find_spec(m) is None]
        if missing:
            return CheckResult(
                ok=False, detail=f"demo model not converted and {', '.join(missing)} missing"
            )
        return CheckResult(ok=True, detail=f"demo model {name}, fetched and converted on first use")
    path = Path(model).expanduser()
    if path.exists():
        return CheckResult(ok=True, detail=f"local model {name}")
    if model.startswith(("/", ".", "~")) or model.endswith(".gguf"):
        return CheckResult(ok=False, detail=f"no model {name!r} where DETOX_MODEL points")
    return CheckResult(ok=True, detail=f"hub id {model!r}, fetched by the worker")
