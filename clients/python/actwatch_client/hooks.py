"""PyTorch forward hooks that stream a model's hidden states to an actwatch monitor.

torch is imported lazily (only when a hook is built), so the package works without it.

    hook = ActivationMonitorHook(model, {"2": "encoder.layer.2", "4": "encoder.layer.4"},
                                 client, "minilm", pool="mean", mode="score")
    with hook.batch(trace_ids, attention_mask):
        model(**inputs)
    for result in hook.results.computations(n=len(trace_ids), timeout=30): ...

Each forward pass sends one TraceBatch per hooked site, as soon as that module has run. A module's
output may be a tensor, or a tuple/list/ModelOutput whose first tensor is the hidden states. Tensors
are sent in their own dtype (bf16 stays bf16). In ``mode="score"``, leaving ``batch()`` (or the next
``set_batch``, or ``close``) marks the batch's computations complete, so one ComputationScore per
trace id arrives on ``hook.results``. With a monitor that flags early (the default one does), a
computation whose running statistic crosses the threshold before it is complete (e.g. at its first
hooked site, or at a token with ``pool="none"``) is reported at once: to ``on_early_flag`` (called
from the stream's reading thread, with a ComputationScore whose ``partial`` is True and whose
``flagged_at`` says where) and in the ``early_flags`` of the TraceResults on ``hook.results``. In
``mode="ingest"``, batches go to one reference-ingest stream; ``close()`` ends it and returns the
server's IngestSummary. ``hook.batch(trace_ids, mask, labels=...)`` (ingest mode) sends that batch as
labelled examples for the monitor's concept probes instead of reference traffic.

Provenance. Every batch a hook sends declares what produced it (``TraceBatch.provenance``), per site:

- ``model``: ``model.config._name_or_path`` (Hugging Face models), else ``model.name_or_path``, else
  the model's class, ``type(model).__module__ + "." + type(model).__qualname__`` (e.g.
  "torch.nn.modules.container.Sequential");
- ``revision``: ``model.config._commit_hash`` when it is a non-empty string, else undeclared;
- ``capture``: ``"actwatch_client.hooks:<module name>:output"``, the forward hook on that submodule's
  output (a capture path of its own, distinct from e.g. ``actwatch capture``);
- ``pooling``: the hook's ``pool`` ("mean" or "none");
- ``dtype``: the dtype of the hooked output, the one the model computed in, without "torch."
  ("float32", "bfloat16", ...).

``provenance=Provenance(...)`` overrides fields: those it sets win, the others keep the automatic value.
A monitor records what its reference batches declared per site; a scored batch that declares
something else (another checkpoint, the model cast to bfloat16 after a float32 reference, another
pooling) is refused with FAILED_PRECONDITION (the score stream, ``hook.results``, ends with that
error), or, on a monitor created with ``provenance_policy="warn"``, scored with
``TraceResults.provenance_warnings`` set and a ProvenanceMismatchWarning from ``hook.results``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Callable, Literal, Optional, Union

import numpy.typing as npt

from ._streams import EarlyFlagCallback, IngestSession, ScoreStream
from .client import Client
from .results import IngestSummary, MonitorInfo, MonitorRef, Provenance, merge_provenance
from .tensors import row_labels, to_trace_batch, trace_id_strings
from .types import Labels, TraceId

if TYPE_CHECKING:  # torch is optional: imported only when a hook is built
    import torch

__all__ = ["CAPTURE_PREFIX", "ActivationMonitorHook", "MaskLike", "Mode", "Pool", "model_provenance", "pool_hidden"]

#: "mean": one row per computation (mask-weighted mean over tokens); "none": one row per token.
Pool = Literal["mean", "none"]
#: "ingest": reference data; "score": live scoring.
Mode = Literal["ingest", "score"]
POOLS: tuple[Pool, ...] = ("mean", "none")
MODES: tuple[Mode, ...] = ("ingest", "score")

#: An attention mask [batch, tokens] (non-zero: a real token): a torch tensor or anything
#: ``torch.as_tensor`` takes (numpy array, nested lists).
MaskLike = Union["torch.Tensor", npt.ArrayLike]

#: The capture path a hook declares is ``f"{CAPTURE_PREFIX}:{module name}:output"``.
CAPTURE_PREFIX = "actwatch_client.hooks"
# The server's limit on each provenance field (bytes); checked here for the automatic values, so a
# long model path fails when the hook is built, not at the first forward pass.
_MAX_PROVENANCE_BYTES = 256


def _non_empty_str(value: object) -> Optional[str]:
    return value if isinstance(value, str) and value else None


def model_provenance(model: object) -> Provenance:
    """What a hook declares of ``model``: ``model`` (``config._name_or_path``, ``name_or_path``, else
    the class's module and qualified name) and ``revision`` (``config._commit_hash``, if any)."""
    config = getattr(model, "config", None)
    name = _non_empty_str(getattr(config, "_name_or_path", None)) or _non_empty_str(
        getattr(model, "name_or_path", None)
    )
    if name is None:
        name = f"{type(model).__module__}.{type(model).__qualname__}"
    return Provenance(model=name, revision=_non_empty_str(getattr(config, "_commit_hash", None)))


def _dtype_name(dtype: object) -> str:
    name = str(dtype)
    return name[len("torch.") :] if name.startswith("torch.") else name


def _check_automatic(site: str, provenance: Provenance) -> None:
    for field, value in provenance.declared().items():
        size = len(value.encode())
        if size > _MAX_PROVENANCE_BYTES or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
            raise ValueError(
                f"site {site!r}: the server would refuse the provenance {field} {value!r} (at most "
                f"{_MAX_PROVENANCE_BYTES} bytes, no control characters); pass provenance=Provenance({field}=...) "
                "to the hook to declare another"
            )


def _first_tensor(output: object) -> torch.Tensor:
    import torch

    if isinstance(output, torch.Tensor):
        return output
    values: Iterable[object] = ()
    if isinstance(output, Mapping):
        values = output.values()
    elif isinstance(output, (tuple, list)):
        values = output
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"module output has no tensor to monitor (got {type(output).__name__})")


def pool_hidden(
    hidden: torch.Tensor, attention_mask: Optional[MaskLike] = None, *, pool: Pool = "mean"
) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """Turns a module output into rows to send.

    ``hidden`` is [batch, d] (already one vector per computation) or [batch, tokens, d].
    pool="mean": the attention-mask-weighted mean over tokens -> ([batch, d], None), accumulated in
    float32 and returned in the hidden states' dtype. pool="none": one row per unmasked token ->
    ([rows, d], (batch_index, position)) as int64 tensors.
    """
    import torch

    hidden = hidden.detach()
    if hidden.dim() == 2:
        return hidden, None
    if hidden.dim() != 3:
        raise ValueError(f"expected hidden states [batch, d] or [batch, tokens, d], got {tuple(hidden.shape)}")
    b, t, _ = hidden.shape
    if attention_mask is not None:
        mask = torch.as_tensor(attention_mask, device=hidden.device)
        if tuple(mask.shape) != (b, t):
            raise ValueError(f"attention_mask {tuple(mask.shape)} does not match hidden states [batch={b}, tokens={t}]")
        mask = mask != 0
    else:
        mask = torch.ones((b, t), dtype=torch.bool, device=hidden.device)
    if pool == "mean":
        w = mask.to(torch.float32).unsqueeze(-1)
        summed = (hidden.to(torch.float32) * w).sum(dim=1)
        counts = w.sum(dim=1).clamp_min(1.0)
        return (summed / counts).to(hidden.dtype), None
    if pool == "none":
        idx = mask.nonzero(as_tuple=False)  # [rows, 2]: (batch index, token position), row-major
        rows = hidden[idx[:, 0], idx[:, 1]]
        return rows, (idx[:, 0], idx[:, 1])
    raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


class ActivationMonitorHook:
    """Registers forward hooks on named submodules and sends their outputs to a monitor.

    ``modules``: {site: module name} (module names as in ``model.get_submodule``), or a list of module
    names used as site names. Set the computations of the next forward pass with
    ``with hook.batch(trace_ids, attention_mask): model(...)`` or ``hook.set_batch(...)``; one trace id
    per batch element. A forward pass without a batch set raises RuntimeError from the hook. In ingest
    mode, ``labels=`` there (a bool for the whole batch, one per batch element, or {trace id: bool})
    makes the batch labelled examples for the monitor's concept probes.
    ``on_early_flag`` (score mode): called with each early flag of the scoring stream (see the
    module's docstring and ``Client.stream_scores``). ``provenance``: overrides the fields it sets of
    the provenance declared automatically on every batch (see the module's docstring).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        modules: Union[Mapping[str, str], Sequence[str]],
        client: Client,
        monitor: MonitorRef,
        *,
        pool: Pool = "mean",
        mode: Mode = "ingest",
        stream_timeout: Optional[float] = None,
        on_early_flag: Optional[EarlyFlagCallback] = None,
        provenance: Optional[Provenance] = None,
    ):
        import torch  # noqa: F401 - fail early and clearly without torch

        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if on_early_flag is not None and mode != "score":
            raise ValueError('on_early_flag needs mode="score"')
        if provenance is not None and not isinstance(provenance, Provenance):
            raise TypeError(
                f"provenance must be an actwatch_client.Provenance or None, got {type(provenance).__name__}"
            )
        if not isinstance(modules, Mapping):
            modules = {name: name for name in modules}
        self.model = model
        self.client = client
        self.monitor = monitor.name if isinstance(monitor, MonitorInfo) else str(monitor)
        self.pool = pool
        self.mode = mode
        self.sites = dict(modules)
        #: The override given (fields it sets win over the automatic ones).
        self.provenance = provenance
        # Per site, the automatic provenance but the dtype (known at the forward pass), overridden.
        self._provenance: dict[str, Provenance] = {}
        of_model = model_provenance(model)
        for site, name in self.sites.items():
            auto = Provenance(
                model=of_model.model,
                revision=of_model.revision,
                capture=f"{CAPTURE_PREFIX}:{name}:output",
                pooling=pool,
            )
            merged = merge_provenance(auto, provenance)
            assert merged is not None
            _check_automatic(str(site), merged)
            self._provenance[str(site)] = merged
        self._stream_timeout = stream_timeout
        self._on_early_flag = on_early_flag
        self._trace_ids: Optional[list[str]] = None
        self._mask: Optional[MaskLike] = None
        self._labels: Optional[list[bool]] = None
        self._pending_complete: Optional[list[str]] = None
        self._ingest: Optional[IngestSession] = None
        self._scores: Optional[ScoreStream] = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for site, name in self.sites.items():
            module = model.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._make_hook(str(site))))

    # -- sessions

    @property
    def results(self) -> ScoreStream:
        """The scoring stream (mode="score"): iterate it, or ``results.computations(n, timeout)``."""
        if self.mode != "score":
            raise RuntimeError('results exist only in mode="score"')
        if self._scores is None:
            self._scores = self.client.stream_scores(
                self.monitor, timeout=self._stream_timeout, on_early_flag=self._on_early_flag
            )
        return self._scores

    def _session(self) -> Union[IngestSession, ScoreStream]:
        if self.mode == "score":
            return self.results
        if self._ingest is None:
            self._ingest = self.client.ingest_session(self.monitor, timeout=self._stream_timeout)
        return self._ingest

    # -- batches

    def set_batch(
        self,
        trace_ids: Sequence[TraceId],
        attention_mask: Optional[MaskLike] = None,
        *,
        labels: Optional[Labels] = None,
    ) -> None:
        """Sets the computations (one id per batch element) and the optional [batch, tokens] mask for
        the following forward passes. In score mode, completes the previous batch's computations.
        ``labels`` (ingest mode): the computations are labelled examples for the monitor's probes, not
        reference traffic: a bool for all, one per batch element, or {trace id: bool}."""
        if labels is not None and self.mode != "ingest":
            raise ValueError('labels need mode="ingest" (labelled examples are ingested, not scored)')
        ids = trace_id_strings(trace_ids)
        row = row_labels(labels, ids)  # checked before the previous batch is flushed
        self.flush()
        self._trace_ids = ids
        self._mask = attention_mask
        self._labels = row
        self._pending_complete = None

    @contextlib.contextmanager
    def batch(
        self,
        trace_ids: Sequence[TraceId],
        attention_mask: Optional[MaskLike] = None,
        *,
        labels: Optional[Labels] = None,
    ) -> Iterator[ActivationMonitorHook]:
        """``with hook.batch(ids, mask): model(...)``: in score mode, the computations are completed on
        leaving the block. ``labels``: see :meth:`set_batch`."""
        self.set_batch(trace_ids, attention_mask, labels=labels)
        try:
            yield self
        finally:
            self.flush()
            self._trace_ids = None
            self._mask = None
            self._labels = None

    def flush(self) -> None:
        """In score mode, marks the current batch's computations complete (once)."""
        if self.mode == "score" and self._pending_complete:
            ids, self._pending_complete = self._pending_complete, None
            self.results.complete(ids)

    # -- the hook

    def _make_hook(self, site: str) -> Callable[[torch.nn.Module, object, object], None]:
        def hook(module: torch.nn.Module, inputs: object, output: object) -> None:
            self._on_output(site, output)

        return hook

    def _on_output(self, site: str, output: object) -> None:
        import torch

        if self._trace_ids is None:
            raise RuntimeError(
                f"actwatch hook on site {site!r}: no batch set; wrap the forward pass in "
                "`with hook.batch(trace_ids, attention_mask):` or call hook.set_batch(...)"
            )
        with torch.no_grad():
            hidden = _first_tensor(output)
            if hidden.shape[0] != len(self._trace_ids):
                raise ValueError(
                    f"site {site!r}: output batch size {hidden.shape[0]} != {len(self._trace_ids)} trace ids"
                )
            rows, index = pool_hidden(hidden, self._mask, pool=self.pool)
            labels = self._labels
            if index is None:
                ids, positions = self._trace_ids, None
            else:
                b_idx, positions = index
                ids = [self._trace_ids[i] for i in b_idx.tolist()]
                if labels is not None and len(labels) > 1:
                    labels = [labels[i] for i in b_idx.tolist()]
            declared = self._provenance[site]
            if self.provenance is None or self.provenance.dtype is None:
                declared = Provenance(**{**declared.declared(), "dtype": _dtype_name(hidden.dtype)})
            batch = to_trace_batch(site, rows, ids, positions, provenance=declared)
        session = self._session()
        if isinstance(session, IngestSession):
            # One label (for the whole batch) goes as a bool: it is every row's.
            session.send_batch(batch, labels=labels[0] if labels is not None and len(labels) == 1 else labels)
        else:
            session.send_batch(batch)
        if self.mode == "score":
            self._pending_complete = self._trace_ids

    # -- teardown

    def remove(self) -> None:
        """Removes the forward hooks (sessions stay open; see close())."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def close(self) -> Optional[IngestSummary]:
        """Removes the hooks and ends the session: in ingest mode returns the IngestSummary (all
        batches durable); in score mode completes the last batch and half-closes the stream (its
        results can still be read from ``results``)."""
        self.remove()
        if self.mode == "score":
            self.flush()
            if self._scores is not None:
                self._scores.close()
            return None
        if self._ingest is not None:
            return self._ingest.close()
        return None

    def __enter__(self) -> ActivationMonitorHook:
        return self

    def __exit__(
        self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.remove()
            if self._ingest is not None:
                self._ingest.cancel()
            if self._scores is not None:
                self._scores.cancel()
