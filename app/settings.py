"""All configuration, read once from the environment (prefix `DETOX_`) and validated."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_DATABASE_SCHEMES = ("sqlite", "postgresql")
_BROKER_SCHEMES = ("filesystem", "redis", "rediss", "amqp", "memory", "sqla+")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DETOX_", extra="ignore")

    home: Path = Field(Path(".detox"), description="state of the embedded default (DB, broker)")
    cache_dir: Path = Field(
        Path.home() / ".cache" / "detox", description="converted models, shared by processes"
    )
    model: str = Field("demo", description='"demo", a model folder, a .gguf file or a hub id')
    device: str = Field("auto", description='"auto" (CUDA when present), "cpu", "cuda:0", ...')
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    judge: str = Field(
        "offline",
        description='"offline" (the newest offline judge, reported as "offline/3"), "offline/2", '
        '"offline/1" or "hf:<model id or path>"',
    )
    max_new_tokens: int = Field(64, ge=1, le=4096, description="evaluation generation length")
    eval_batch_size: int = Field(8, ge=1, le=256)
    unlearn_bias_pairs_per_type: int | None = Field(
        50, ge=1, le=100_000,
        description="CrowS-Pairs pairs per bias type in an unlearning job's before/after report "
        "(None: all 1,508)",
    )  # fmt: skip
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL (sqlite:///... or postgresql+psycopg://...); "
        "default: SQLite under `home` (see `resolved_database_url`)",
    )
    broker_url: str | None = Field(
        None,
        description="Celery broker URL (redis://... in production); "
        "default: kombu's filesystem transport under `home` (see `resolved_broker_url`)",
    )
    job_max_attempts: int = Field(3, ge=1, le=100, description="claims of a job before it fails")
    job_heartbeat_timeout_s: float = Field(
        120.0, gt=0, description="a running job whose heartbeat is older than this is stale"
    )
    job_max_retries: int = Field(
        5, ge=0, le=100, description="retries of a job's task after transient errors (DB, broker)"
    )
    job_retry_backoff_s: float = Field(2.0, gt=0, description="first retry delay; then doubles")
    job_retry_backoff_max_s: float = Field(120.0, gt=0, description="cap of the retry delay")
    job_soft_time_limit_s: float = Field(
        3600.0, gt=0, description="a job still running after this fails (checked between steps)"
    )
    job_time_limit_s: float = Field(
        3900.0, gt=0, description="hard limit: the task is killed (prefork pool only)"
    )
    broker_visibility_timeout_s: float = Field(
        7200.0,
        gt=0,
        description="Redis: an unacknowledged task is redelivered after this; must exceed "
        "`job_time_limit_s`, or long jobs would be delivered twice",
    )
    broker_connect_timeout_s: float = Field(
        2.0, gt=0, le=60, description="give up reaching the broker (enqueue, ping) after this"
    )
    worker_restart_backoff_s: float = Field(
        1.0, gt=0, le=3600,
        description="`detox up`: a worker that died is restarted after this; doubles while it "
        "keeps dying",
    )  # fmt: skip
    worker_restart_backoff_max_s: float = Field(
        30.0, gt=0, le=3600, description="`detox up`: cap of the worker's restart delay"
    )
    torch_threads: int | None = Field(
        None, ge=1, le=1024, description="CPU threads of torch in a worker (default: torch's)"
    )
    engine: Literal["builtin", "vllm"] = Field(
        "builtin",
        description='what decodes generations: "builtin" (in the API process) or "vllm" (a vLLM '
        "OpenAI server at DETOX_VLLM_URL, every live version a LoRA adapter in it)",
    )
    vllm_url: str = Field("http://127.0.0.1:8001", description="the vLLM server's base URL")
    vllm_max_lora_rank: int = Field(
        64, ge=1, le=512,
        description="the vLLM server's --max-lora-rank: a version whose exact adapter needs more "
        "is not served by it (409)",
    )  # fmt: skip
    vllm_python: Path = Field(
        Path(".venv-vllm/bin/python"),
        description="the Python of vLLM's own venv (`make vllm`), for `detox up --engine vllm`",
    )
    vllm_adapter_dir: Path | None = Field(
        None,
        description="where versions are written as adapters for vLLM to read (default: "
        "<cache_dir>/vllm-adapters); vLLM must see the same path",
    )
    serving_cache_size: int = Field(
        8, ge=1, le=1024, description="versions whose summed deltas the serving engine keeps"
    )
    serving_max_batch_size: int = Field(
        32, ge=1, le=512, description="requests decoded together in one batch, at most"
    )
    serving_max_wait_ms: float = Field(
        10.0, ge=0, le=10_000,
        description="how long an idle engine waits for more requests to start together",
    )  # fmt: skip
    serving_batching: Literal["continuous", "static"] = Field(
        "continuous",
        description='"continuous": requests join and leave the running batch at every decoding '
        'step; "static": a batch runs to its end before the next starts',
    )
    serving_prefill_tokens: int = Field(
        128, ge=1, le=1_048_576,
        description="prompt tokens prefilled per decoding step (continuous batching): how long "
        "a new prompt may stall the running streams",
    )  # fmt: skip
    serving_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="the serving engine's weights: auto = bfloat16 on CUDA and on CPUs with "
        "native bfloat16 (AVX512-BF16, AMX), else float32; edits keep DETOX_DTYPE",
    )
    serving_packed: bool = Field(
        True,
        description="bfloat16 linear layers on the CPU compute from weights packed once for "
        "oneDNN (faster; the packed copy costs the weights' memory again)",
    )
    serving_lean_step: bool = Field(
        True,
        description="decoding steps of Llama-like models call their layers directly, not the "
        "model's forward: less overhead per token; the model's logits as in a padded batch "
        "(checked by a probe at start), in bfloat16 within rounding of them without padding",
    )
    serving_max_tokens: int = Field(
        512, ge=1, le=32_768, description="cap of max_tokens on the generation endpoints"
    )
    serving_preload: bool = Field(
        False, description="load the model when the API starts, not on the first generation"
    )
    serving_poll_s: float = Field(
        1.0, gt=0, le=3600, description="how often the engine re-reads the live versions"
    )
    experiment_cache_s: float = Field(
        1.0, gt=0, le=600, description="how long an API process routes on an experiment it read"
    )
    corpus_max_bytes: int = Field(
        50 * 1024 * 1024,
        ge=1024,
        le=512 * 1024**2,  # stored whole in one row: well inside PostgreSQL's 1 GB per value
        description="largest corpus upload (bytes of the request body); larger is refused (413)",
    )
    serving_max_prompt_tokens: int | None = Field(
        None, ge=1, le=1_048_576,
        description="longest prompt in tokens (413 beyond it); None: only the context limits it",
    )  # fmt: skip
    serving_max_pending: int = Field(
        64, ge=1, le=100_000,
        description="generation requests waiting or running at once; more are refused with 503",
    )  # fmt: skip
    auth: bool = Field(
        True, description="require API keys (DETOX_AUTH=false only on a loopback address)"
    )
    admin_key: SecretStr | None = Field(
        None, description="a bootstrap admin key accepted besides the stored keys (DETOX_ADMIN_KEY)"
    )
    auth_cache_s: float = Field(
        5.0, ge=0, le=3600,
        description="seconds a checked key is trusted without a database read (0: every request); "
        "a revocation reaches other API processes within this",
    )  # fmt: skip
    rate_limit_per_minute: int = Field(
        600, ge=0, le=10_000_000, description="requests per minute per API key (0: no limit)"
    )
    rate_limit_burst: int = Field(
        60, ge=1, le=10_000_000, description="requests a key may make at once above the rate"
    )
    max_request_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, le=1024**3,
        description="largest request body (corpus uploads: corpus_max_bytes); 413 beyond it",
    )  # fmt: skip
    max_active_jobs_per_key: int = Field(
        100, ge=1, le=1_000_000,
        description="queued or running jobs one API key may have; more are refused with 429",
    )  # fmt: skip
    log_format: Literal["json", "text"] = Field(
        "json", description="server logs: one JSON object a line, or plain text"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    url: str = Field(
        "http://127.0.0.1:8000", description="the API's address, for the CLI clients (DETOX_URL)"
    )
    api_key: str | None = Field(None, description="the CLI clients' key (DETOX_API_KEY)")

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is not None and value.split(":", 1)[0].split("+", 1)[0] not in _DATABASE_SCHEMES:
            raise ValueError(f"must be a sqlite:// or postgresql:// URL, not {value!r}")
        return value

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL, not {value!r}")
        return value.rstrip("/")

    @field_validator("broker_url")
    @classmethod
    def _check_broker_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(_BROKER_SCHEMES):
            raise ValueError(f"unsupported broker URL {value!r}")
        return value

    @model_validator(mode="after")
    def _check_time_limits(self) -> Settings:
        if self.job_time_limit_s <= self.job_soft_time_limit_s:
            raise ValueError("job_time_limit_s must exceed job_soft_time_limit_s")
        if self.broker_visibility_timeout_s <= self.job_time_limit_s:
            raise ValueError("broker_visibility_timeout_s must exceed job_time_limit_s")
        return self

    def home_dir(self) -> Path:
        """`home` as an absolute path, created when missing."""
        path = self.home.expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path

    def resolved_database_url(self) -> str:
        """`database_url`, or `sqlite:///{home}/detox.db` (creating `home`) when unset."""
        if self.database_url is not None:
            return self.database_url
        return f"sqlite:///{self.home_dir() / 'detox.db'}"

    def resolved_broker_url(self) -> str:
        """`broker_url`, or `filesystem://` (folders: `broker_folders`) when unset."""
        return self.broker_url if self.broker_url is not None else "filesystem://"

    def broker_folders(self) -> dict[str, Path]:
        """Folders of the filesystem transport under `{home}/broker`, created when missing.

        As kombu's transport options: `data_folder_in` and `data_folder_out` are one folder (the
        queue, shared by producer and consumer), `processed_folder` keeps consumed messages,
        `control_folder` holds the exchange bindings (kombu's default is `./control`).
        """
        root = self.home_dir() / "broker"
        folders = {
            "data_folder_in": root / "queue",
            "processed_folder": root / "processed",
            "control_folder": root / "control",
        }
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        return {**folders, "data_folder_out": folders["data_folder_in"]}


@lru_cache
def get_settings() -> Settings:
    return Settings()
