"""Every configuration of esg-memory in one place: frozen dataclasses with documented fields, and the modes.

Each mode family is one ``Literal`` type and one tuple of its values (`SETTLE_MODES`, `TUNE_MODES`, ...):
code that checks or lists a mode uses the tuple, never a repeated string literal. Configs are frozen
(`dataclasses.replace` makes a changed copy): a memory's `MemoryConfig` is part of its saved state, and
a config that could change under a running memory would change its routing silently.

=====================  =========================================================================
`MemoryConfig`         how scopes are learned (saved with every memory; changing one changes routing)
`JournalConfig`        when a durable memory compacts its journal into a new snapshot
`StoreConfig`          how a replica follows a shared (PostgreSQL) memory: staleness bound, retries
`AdapterConfig`        how prefix adapters are compiled, tuned and stored
`EditedModelConfig`    wrapper behaviour (saved next to the memory by `EditedModel.save`)
`ServiceConfig`        the limits and batching of ``esg-memory serve``
=====================  =========================================================================
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from .errors import ConfigError, EsgMemoryError, FormatError
from .types import from_fields

__all__ = [
    "MODEL_DTYPES",
    "SETTLE_MODES",
    "STORAGE_DTYPES",
    "TUNED_KINDS",
    "TUNE_MODES",
    "AdapterConfig",
    "EditedModelConfig",
    "JournalConfig",
    "MemoryConfig",
    "ModelDtype",
    "ServiceConfig",
    "SettleMode",
    "StorageDtype",
    "StoreConfig",
    "TuneMode",
    "TunedKind",
    "check_model_dtype",
    "check_tune_mode",
]

SettleMode = Literal["background", "sync", "manual"]
"""When a delete re-fits its holders: see `MemoryConfig.settle`."""
SETTLE_MODES: tuple[str, ...] = get_args(SettleMode)

TuneMode = Literal["auto", "never", "sync", "background"]
"""Whether an added or revised edit's adapter is tuned. ``"auto"`` (the default): the edit is written and
compiled at once, then its own input is checked (does the model now give the edit's answer?) and the
adapter tuned only when it does not, in a background thread; ``"never"``: compiled only, not checked;
``"sync"`` / ``"background"``: always tuned, before the call returns / in a background thread."""
TUNE_MODES: tuple[str, ...] = get_args(TuneMode)

TunedKind = Literal["auto", "soft", "kv"]
"""Parametrisation of a tuned adapter: see `AdapterConfig.tuned_kind`."""
TUNED_KINDS: tuple[str, ...] = get_args(TunedKind)

StorageDtype = Literal["float16", "bfloat16", "float32"]
"""dtype tuned adapter parameters are stored in."""
STORAGE_DTYPES: tuple[str, ...] = get_args(StorageDtype)

ModelDtype = Literal["float32", "float16", "bfloat16"]
"""dtype a base model is loaded in (``load_base_model(dtype=)``, the CLI's ``--dtype``); each name is the
torch dtype of that name."""
MODEL_DTYPES: tuple[str, ...] = get_args(ModelDtype)


def check_model_dtype(dtype: Any, what: str = "dtype") -> str:
    """``dtype`` if it is one of `MODEL_DTYPES`, else `ConfigError` (before any model is loaded)."""
    if not isinstance(dtype, str) or dtype not in MODEL_DTYPES:
        raise ConfigError(f"{what} must be one of {', '.join(MODEL_DTYPES)}, not {dtype!r}")
    return dtype


def check_tune_mode(tune: Any, what: str = "tune", error: type[EsgMemoryError] = ConfigError) -> str:
    """``tune`` if it is one of `TUNE_MODES`, else ``error`` (`ConfigError` for a configuration field,
    `InvalidInputError` for a call argument or a request)."""
    if not isinstance(tune, str) or tune not in TUNE_MODES:
        raise error(f"{what} must be one of {', '.join(TUNE_MODES)}, not {tune!r}")
    return tune


@dataclass(frozen=True)
class MemoryConfig:
    """How scopes are learned. Every field is part of a saved memory (changing one changes routing).

    The neighbour radius (two edits constrain each other when any of their known inputs are at
    least this similar) is derived: ``min_threshold - margin``. Below it an input cannot influence a
    threshold, which is what makes scopes independent of unrelated edits and deletion exact.
    """

    margin: float = field(
        default=0.03, metadata={"help": "Gap kept between a threshold and the hardest negative."}
    )
    placement: float = field(
        default=0.0,
        metadata={
            "help": "Where the threshold sits in the free interval [hardest negative + margin, easiest "
            "positive - margin]: 0 = lowest safe value (widest generalization), 1 = tight around positives."
        },
    )
    min_threshold: float = field(
        default=0.6, metadata={"help": "No key's threshold goes below this cosine (caps a ball's size)."}
    )
    max_threshold: float = field(
        default=0.995, metadata={"help": "No threshold goes above this (a key must still cover near copies)."}
    )
    max_keys: int = field(
        default=4, metadata={"help": "Most keys one edit may own (anchor + extra positives)."}
    )
    n_text_positives: int = field(
        default=4, metadata={"help": "Generated question rephrasings (question_templates) used as positives."}
    )
    n_image_positives: int = field(
        default=2, metadata={"help": "Generated image augmentations (augment_image) used as positives."}
    )
    n_generic_questions: int = field(
        default=8,
        metadata={"help": "Hard negatives 'same image, other question' from built-in generic questions."},
    )
    n_pool_images: int = field(
        default=4,
        metadata={"help": "Hard negatives 'same question, other image' taken from locality-pool images."},
    )
    hard_negative_max_text_sim: float = field(
        default=0.75,
        metadata={
            "help": "A generic/other question this text-similar to the edit's question is not a negative."
        },
    )
    hard_negative_max_image_sim: float = field(
        default=0.9,
        metadata={
            "help": "An image (image-only cosine) this close to the edit's shows the same subject: "
            "not a negative."
        },
    )
    locality_pool_size: int = field(
        default=1000,
        metadata={"help": "Most unrelated inputs (locality pool) used as negatives by every edit."},
    )
    neighbour_k: int = field(
        default=4,
        metadata={
            "help": "Nearest neighbour edits whose question/image are crossed with this edit's "
            "as hard negatives."
        },
    )
    max_neighbours: int = field(
        default=16,
        metadata={
            "help": "Most neighbour edits that constrain one edit's scope: the nearest ones (by link "
            "cosine, ties by id) within the neighbour radius; 0 = all of them. Bounds what one add or "
            "delete re-fits when many edits look alike; saved memories from before this field load as 0."
        },
    )
    route_k: int = field(default=8, metadata={"help": "Candidate edits examined per routed input."})
    separate_same_answer: bool = field(
        default=False,
        metadata={
            "help": "Also keep apart edits whose answers are equal "
            "(default: only different answers conflict)."
        },
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of generated positives (mixed with each edit's content)."}
    )
    settle: SettleMode = field(
        default="background",
        metadata={
            "help": "When a delete re-fits the neighbours the deleted edit constrained: 'background' "
            "(the delete returns once the edit stops routing; a thread re-fits them right after), "
            "'manual' (at the next write, save or settle()), 'sync' (inside the delete call). Until "
            "then they keep the scopes they had while it existed; afterwards the memory routes as if "
            "the edit never existed. Does not change settled routing."
        },
    )

    def __post_init__(self) -> None:
        self.validate()

    @property
    def neighbour_radius(self) -> float:
        return self.min_threshold - self.margin

    def validate(self) -> None:
        def num(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"MemoryConfig.{name} must be a finite number, got {v!r}")
            return float(v)

        def count(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"MemoryConfig.{name} must be an integer >= {lo}, got {v!r}")

        if not 0.0 <= num("margin") < 0.5:
            raise ConfigError(f"MemoryConfig.margin must be in [0, 0.5), got {self.margin}")
        if not 0.0 <= num("placement") <= 1.0:
            raise ConfigError(f"MemoryConfig.placement must be in [0, 1], got {self.placement}")
        lo, hi = num("min_threshold"), num("max_threshold")
        if not -1.0 < lo <= hi < 1.0:
            raise ConfigError(f"need -1 < min_threshold <= max_threshold < 1, got {lo} and {hi}")
        for name in ("hard_negative_max_text_sim", "hard_negative_max_image_sim"):
            if not -1.0 <= num(name) <= 1.0:
                raise ConfigError(f"MemoryConfig.{name} must be in [-1, 1]")
        count("max_keys", 1)
        for name in (
            "n_text_positives",
            "n_image_positives",
            "n_generic_questions",
            "n_pool_images",
            "locality_pool_size",
            "neighbour_k",
            "max_neighbours",
            "seed",
        ):
            count(name, 0)
        count("route_k", 1)
        if not isinstance(self.separate_same_answer, bool):
            raise ConfigError("MemoryConfig.separate_same_answer must be a bool")
        if self.settle not in SETTLE_MODES:
            raise ConfigError(
                f"MemoryConfig.settle must be one of {', '.join(SETTLE_MODES)}, got {self.settle!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryConfig:
        if isinstance(data, dict) and "max_neighbours" not in data:
            # Written before the cap existed: every edit within the radius was a neighbour.
            data = {**data, "max_neighbours": 0}
        try:
            return from_fields(cls, data, "config")
        except ConfigError as e:
            raise FormatError(f"saved config is invalid: {e}") from None


@dataclass(frozen=True)
class JournalConfig:
    """When a durable memory compacts its journal into a new snapshot."""

    compact_bytes: int = 64 * 2**20
    """Compact once the journal segment in use holds this many bytes (0: only on `compact`/`close`).
    Replay time at open grows with the journal; a snapshot costs O(edits)."""
    background: bool = True
    """Write auto-compaction snapshots in a background thread. Writers then wait only for the
    capture (dict copies, the index saving itself, a new journal segment: milliseconds to a
    fraction of a second at 10k edits) instead of the whole snapshot (seconds: one file per image
    and adapter, each fsynced). The price: a second copy of the dict structure (not of the arrays,
    which are shared and immutable) while the snapshot is written."""
    compact_on_close: bool = True
    """`close` writes a snapshot first, so the next open replays nothing."""

    def __post_init__(self) -> None:
        cb = self.compact_bytes
        if isinstance(cb, bool) or not isinstance(cb, int) or cb < 0:
            raise ConfigError("compact_bytes must be an int >= 0")


@dataclass(frozen=True)
class StoreConfig:
    """How a replica follows a memory shared through PostgreSQL (`esg_memory.replicas`)."""

    staleness_bound_s: float = 2.0
    """A replica that cannot vouch for having applied every acknowledged write older than this many
    seconds (it lags, or it cannot reach the store) reports unhealthy, so a load balancer drains it."""
    poll_s: float = 0.5
    """Longest wait for a notification before the replica checks the log anyway (and proves its
    connection alive). Notifications wake it at once; this only bounds how stale a silent failure gets."""
    max_replans: int = 64
    """A write planned on a log position another replica moved past is re-planned after catching up;
    after this many tries in a row it fails with `StaleStateError`."""
    connect_timeout_s: float = 3.0
    """Seconds to wait for a connection to the store before a write fails with `StoreUnavailableError`."""

    def __post_init__(self) -> None:
        for name in ("staleness_bound_s", "poll_s", "connect_timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds")
        n = self.max_replans
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError("max_replans must be an int >= 1")
        if self.poll_s >= self.staleness_bound_s:
            raise ConfigError("poll_s must be below staleness_bound_s (a quiet replica would count as stale)")


@dataclass(frozen=True)
class AdapterConfig:
    """How adapters are compiled, tuned and stored."""

    statement_template: str = "Question: {question} Answer: {answer}.\n"
    """Text whose K/V form the compiled prefix; ``{question}`` and ``{answer}`` are filled in."""
    tuned_kind: TunedKind = "auto"
    """Parametrisation tuned by ``tune="sync"|"background"``: low-rank soft prompt (small) or K/V (large).
    ``"auto"``: K/V when a full K/V prefix fits ``soft_budget_bytes`` (small models: strongest and fastest),
    else the soft prompt (7B-class models, where K/V would cost megabytes per edit)."""
    soft_rank: int | None = None
    """Rank of the soft-prompt delta (bytes grow as ``rank * (P + hidden)``); None: the largest rank whose
    stored adapter fits ``soft_budget_bytes`` (capped at ``min(P, hidden)``, i.e. a full-rank delta)."""
    soft_budget_bytes: int = 64 * 1024
    """Storage budget of one soft adapter when ``soft_rank`` is None (rank 7 for a 7B model, full on tiny)."""
    storage_dtype: StorageDtype = "float16"
    """dtype tuned parameters are stored (and verified) in."""
    lr: float | None = None
    """Adam learning rate for tuning; None: 0.3 for K/V prefixes, 0.03 for soft prompts (measured on the
    shipped easy-vqa LLaVA: K/V at 0.03 needs ~290 steps, at 0.3 ~140)."""
    max_steps: int = 300
    """Give up (report ``exact=False``) after this many steps."""
    patience: int | None = None
    """Also give up when the best point (the edit's own input first, then the smallest margin over every
    example) has not improved by ``0.01`` in this many steps; None: only ``max_steps`` ends a miss. The
    edits that miss on a small model stall early and far from the margin: every step they take past the
    stall is spent for nothing (measured on the scenes world: ``benchmarks/results/tuning_budget.md``)."""
    margin: float = 1.0
    """Required logit margin of every target token over the runner-up before tuning stops."""
    max_examples: int = 16
    """At most this many (image, prompt) examples (edit input + positives) per tuning step."""
    seed: int = 0
    """Seed for the soft-prompt delta's random factor (tuning is deterministic given the inputs)."""
    cache_size: int = 512
    """Number of (edit, version) K/V prefixes kept hot in memory."""

    def __post_init__(self) -> None:
        if "{answer}" not in self.statement_template:
            raise ConfigError("statement_template must contain {answer}")
        if self.tuned_kind not in TUNED_KINDS:
            raise ConfigError(f"tuned_kind must be one of {', '.join(TUNED_KINDS)}, not {self.tuned_kind!r}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ConfigError(f"storage_dtype must be one of {', '.join(STORAGE_DTYPES)}")
        if self.soft_rank is not None and self.soft_rank < 1:
            raise ConfigError("soft_rank must be None or >= 1")
        if min(self.max_steps, self.max_examples, self.cache_size, self.soft_budget_bytes,
               1 if self.patience is None else self.patience) < 1:
            raise ConfigError(
                "max_steps, max_examples, patience, cache_size and soft_budget_bytes must be >= 1"
            )
        if not ((self.lr is None or self.lr > 0) and self.margin >= 0):
            raise ConfigError("lr must be > 0 and margin >= 0")


@dataclass(frozen=True)
class EditedModelConfig:
    """Wrapper behaviour; saved next to the memory by :meth:`EditedModel.save`."""

    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    """How adapters are compiled, tuned and stored."""
    tune: TuneMode = "auto"
    """Default for ``add_edit(tune=None)`` / ``revise_edit(tune=None)``: see `TuneMode` (``"auto"``: check the
    edit's own input, tune in the background when it does not get the answer)."""
    n_paraphrases: int = 4
    """Generated question rewrites (``question_templates``) added to the tuning examples."""
    n_augmented_images: int = 2
    """Generated views of the edit image (``augment_image``) added to the tuning examples."""
    n_unrelated_questions: int = 8
    """Questions unrelated to the edit (`esg_memory.scope.GENERIC_QUESTIONS`) asked about the edit's picture
    and added to the tuning examples with the edit's answer. The router keeps an adapter inside its edit's
    scope, so an adapter taught to give the answer whatever it is asked loses nothing out of scope and gains
    phrasings it never saw (``benchmarks/bench_fidelity.py`` measures it)."""

    def __post_init__(self) -> None:
        if isinstance(self.adapters, dict):  # as saved in edited_model.json
            object.__setattr__(self, "adapters", AdapterConfig(**self.adapters))
        check_tune_mode(self.tune, "tune")
        if self.n_paraphrases < 0 or self.n_augmented_images < 0 or self.n_unrelated_questions < 0:
            raise ConfigError("n_paraphrases, n_augmented_images and n_unrelated_questions must be >= 0")


@dataclass(frozen=True)
class ServiceConfig:
    """Limits and batching of the service."""

    max_batch_rows: int = 16
    """At most this many rows (prompts) decoded in one model call."""
    batch_wait_ms: float = 3.0
    """How long the first request of a batch waits for others with the same options."""
    max_queue: int = 256
    """Queued generate requests beyond this are refused (HTTP 503) instead of growing latency."""
    max_rows_per_request: int = 16
    """Prompts one /generate or /route request may carry."""
    max_new_tokens_limit: int = 256
    """Upper bound a client may ask for."""
    max_prompt_chars: int = 4000
    """Longest prompt accepted."""
    request_timeout_s: float = 300.0
    """A generate request waiting longer than this fails with HTTP 504."""
    read_only: bool = False
    """Refuse every write (no token needed, nothing persisted)."""
    compact_bytes: int = 64 * 2**20
    """Journal size that triggers a background snapshot (compaction); 0 = only at shutdown."""

    def __post_init__(self) -> None:
        if self.max_batch_rows < 1 or self.max_queue < 1 or self.max_rows_per_request < 1:
            raise ConfigError("max_batch_rows, max_queue and max_rows_per_request must be >= 1")
        if self.batch_wait_ms < 0 or self.request_timeout_s <= 0 or self.max_new_tokens_limit < 1:
            raise ConfigError("batch_wait_ms >= 0, request_timeout_s > 0, max_new_tokens_limit >= 1 required")
