"""Approvals carry the relay's authority: the relay seals each verdict it sends, the worker
checks the seal before the workflow sees the verdict.

The seal is an HMAC-SHA256 (a key from `REFUNDS_APPROVAL_KEYS`, which only the relay and
the worker hold) over the workflow id, the run chain it was sent to (the chain's first run
id: a continue-as-new keeps it, a reopened break or a case started again under its id gets
a new one), decision, approver, roles, reason, the round it was given for (`awaiting`, when
named), the time it was issued (to the millisecond:
the money gate judges the approver's token as of it) and a nonce. It travels in a Temporal
header of the `approve` signal or the `submit_approval` update, put there by a client
interceptor on the relay's client only.
On the worker an interceptor (built outside the sandbox, so it holds the keys and the
workflow never does) checks it and hands the workflow a `CheckedApproval` that says whether
the seal held; a payload always converts to a plain `ApprovalSignal`, so no caller can send
a checked one. Only the seal (never a key) is in history. The check is deterministic on
replay: it reads the header and `workflow.now()`, and a key stays listed (verify only) as
long as a case that holds approvals sealed with it may still replay. Seals made before the
chain was covered (`v1`, in recorded histories) still verify; the relay makes none now, and
a captured one is stale after `MAX_AGE`.

Provider news is sealed too (`news-sealed-1`): a refund or payout event signalled to a case
(`provider_event`, `payout_event`, signal-with-start included) moves money state (a late
failure reverses a booked refund and opens its reissue), so only the holders of the keys,
relay and workers, may report it. Every product client built by `connect` seals the news it
sends (`NewsSealing`), a workflow's signal to another case too (the worker's outbound
interceptor); the seal is an HMAC over the workflow id, the signal and the event. It has no
window and no nonce: an event is a fact deduplicated by its id, so its seal holds whenever
it is handled, however long the worker was away.
"""

import dataclasses
import hashlib
import hmac
import json
import secrets
from collections.abc import Coroutine, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio import client, workflow
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadConverter
from temporalio.worker import (
    HandleSignalInput,
    HandleUpdateInput,
    Interceptor,
    SignalExternalWorkflowInput,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
    WorkflowOutboundInterceptor,
)

from adapters.config import Settings, secret_list
from domain.models import ApprovalSignal, ProviderEvent
from domain.payouts import PayoutEvent, ReissueAsk
from domain.seals import (
    CheckedApproval,
    CheckedPayoutEvent,
    CheckedProviderEvent,
    CheckedReissueAsk,
    unchecked,
)

SEAL_HEADER = "refunds-approval-seal"
SEAL_VERSION = "v3"
"""Issued to the millisecond: a verdict's token is judged as of its seal (`sealed_at`)."""
SECONDS_VERSION = "v2"
"""Issued to the second: made before `v3`, still verified on replay."""
LEGACY_VERSION = "v1"
"""Seals over no run chain: made before the chain was covered, still verified on replay."""
TICKS_PER_SECOND = {SEAL_VERSION: 1000, SECONDS_VERSION: 1, LEGACY_VERSION: 1}
APPROVE_SIGNAL = "approve"
APPROVAL_UPDATE = "submit_approval"
REISSUE_UPDATE = "request_reissue"
MAX_AGE = timedelta(minutes=15)
"""A seal older than this (by the workflow's clock) is refused: a captured one goes stale."""
MAX_SKEW = timedelta(minutes=1)
"""How far ahead of the workflow's clock the relay's clock may be."""
OUTSIDE_WINDOW = f"approval seal is outside its {int(MAX_AGE.total_seconds())} s window"
_HEADER_CONVERTER = PayloadConverter.default
NEWS_SIGNALS = frozenset({"provider_event", "payout_event"})
NEWS_HEADER = "refunds-news-seal"
NEWS_VERSION = "n1"


Sealed = ApprovalSignal | ReissueAsk
"""What the relay seals: a verdict, or a request to reissue a payout (its requester is the
one person barred from approving that reissue, so the name must be the relay's)."""


def _message(version: str, workflow_id: str, chain: str | None, sealed: Sealed, issued_at: int,
             nonce: str) -> bytes:
    """What a seal covers, canonical JSON, so no field can move into another. The verdict id
    only when there is one, the chain only in a current seal, so seals made before either
    (in recorded histories) still verify. A reissue request's names its kind, so it is never
    a verdict's (and never a `v1`: those were made before it was sealed)."""
    covered: dict[str, object] = {
        "v": version, "workflow_id": workflow_id,
        "roles": sorted(sealed.roles), "reason": sealed.reason, "issued_at": issued_at, "nonce": nonce}
    if isinstance(sealed, ReissueAsk):
        covered.update(kind=REISSUE_UPDATE, requester=sealed.requester)
    else:
        covered.update(decision=sealed.decision.value, approver=sealed.approver)
        if sealed.verdict_id:
            covered["verdict_id"] = sealed.verdict_id
        if sealed.awaiting:
            covered["awaiting"] = sealed.awaiting
    if chain is not None:
        covered["chain"] = chain
    return json.dumps(covered, sort_keys=True, separators=(",", ":")).encode()


def _news_message(workflow_id: str, signal: str, event: ProviderEvent | PayoutEvent) -> bytes:
    """What a news seal covers: the case, the signal and the event as canonical JSON (fields
    at their defaults left out, so a field added with a default later reads the same)."""
    covered = {"v": NEWS_VERSION, "workflow_id": workflow_id, "signal": signal,
               "event": unchecked(event).model_dump(mode="json", exclude_defaults=True)}
    return json.dumps(covered, sort_keys=True, separators=(",", ":")).encode()


def _mac(key: str, message: bytes) -> str:
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


def sealed_at(seal: str) -> datetime:
    """When the relay sealed a verdict (`check` has held it): when its approver's access was
    last read. A `v3` seal says it to the millisecond, an older one to the second."""
    version, issued = seal.split(".", 2)[:2]
    return datetime.fromtimestamp(int(issued) / TICKS_PER_SECOND[version], UTC)


class ApprovalKeys:
    """The rotation list: the first key seals, every key verifies."""

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys or not all(keys):
            raise ValueError("approval sealing needs at least one non-empty key")
        self._keys = tuple(keys)

    @property
    def count(self) -> int:
        """How many keys verify (the rotation list's length)."""
        return len(self._keys)

    def seal(self, workflow_id: str, sealed: Sealed, *, chain: str, now: datetime) -> str:
        """A seal for this verdict (or reissue request), sent to this workflow's run chain `chain`."""
        issued_at, nonce = int(now.timestamp() * TICKS_PER_SECOND[SEAL_VERSION]), secrets.token_hex(16)
        mac = _mac(self._keys[0], _message(SEAL_VERSION, workflow_id, chain, sealed, issued_at, nonce))
        return f"{SEAL_VERSION}.{issued_at}.{nonce}.{chain}.{mac}"

    def check(self, workflow_id: str, signal: Sealed, seal: str | None, *, chain: str,
              now: datetime) -> tuple[str, str]:
        """(refusal, nonce): refusal is "" when one key sealed exactly this verdict for this
        workflow's run chain `chain` within the window."""
        if not seal:
            return "approval not sealed by the relay", ""
        version, _, rest = seal.partition(".")
        issued, _, rest = rest.partition(".")
        nonce, _, rest = rest.partition(".")
        sealed_chain, _, mac = rest.partition(".") if version != LEGACY_VERSION else (None, "", rest)
        if (version not in TICKS_PER_SECOND or sealed_chain == ""
                or (sealed_chain is None and isinstance(signal, ReissueAsk))
                or not (issued.isascii() and issued.isdigit() and len(issued) <= 15) or not nonce or not mac):
            return "approval seal is malformed", ""
        message = _message(version, workflow_id, sealed_chain, signal, int(issued), nonce)
        if not any(hmac.compare_digest(mac.encode(), _mac(k, message).encode()) for k in self._keys):
            return "approval seal does not match this verdict", ""
        if sealed_chain is not None and sealed_chain != chain:
            return ("approval was sealed for an earlier run of this case (a round since closed, "
                    "before the case was reopened or started again)"), ""
        age = now.timestamp() - int(issued) / TICKS_PER_SECOND[version]
        if age < -MAX_SKEW.total_seconds():
            return OUTSIDE_WINDOW, ""
        if age > MAX_AGE.total_seconds():
            return OUTSIDE_WINDOW, nonce  # past it: the nonce still counts once (a late denial)
        return "", nonce


    def seal_news(self, workflow_id: str, signal: str, event: ProviderEvent | PayoutEvent) -> str:
        return f"{NEWS_VERSION}.{_mac(self._keys[0], _news_message(workflow_id, signal, event))}"

    def check_news(self, workflow_id: str, signal: str, event: ProviderEvent | PayoutEvent,
                   seal: str | None) -> str:
        """Why `seal` does not hold for this event sent to this case ("" when it does)."""
        if not seal:
            return "provider news not sealed by the relay or a worker"
        version, _, mac = seal.partition(".")
        message = _news_message(workflow_id, signal, event)
        if version != NEWS_VERSION or not any(
                hmac.compare_digest(mac.encode(), _mac(k, message).encode()) for k in self._keys):
            return "provider news seal does not match this event"
        return ""


def approval_keys(settings: Settings) -> ApprovalKeys | None:
    """The configured keys, or None: then the relay seals nothing and the worker counts nothing."""
    return ApprovalKeys(secret_list(settings.approval_keys)) if settings.approval_keys else None


def _approval_arg(name: str, expected: str, args: Sequence[Any]) -> ApprovalSignal | None:
    if name == expected and args and isinstance(args[0], ApprovalSignal):
        return args[0]
    return None


def _news_arg(name: str | None, args: Sequence[Any]) -> ProviderEvent | PayoutEvent | None:
    if name in NEWS_SIGNALS and args and isinstance(args[0], ProviderEvent | PayoutEvent):
        return args[0]
    return None


def _with_news_seal(keys: ApprovalKeys, workflow_id: str, signal: str | None, args: Sequence[Any],
                    headers: Mapping[str, Payload]) -> Mapping[str, Payload]:
    """`headers` with the seal of the news `args` carry, if `signal` is a news signal."""
    event = _news_arg(signal, args)
    if event is None or signal is None:
        return headers
    seal = keys.seal_news(workflow_id, signal, event)
    return {**headers, NEWS_HEADER: _HEADER_CONVERTER.to_payloads([seal])[0]}


def _sealed_update_arg(name: str, args: Sequence[Any]) -> Sealed | None:
    """The verdict of a `submit_approval` or the request of a `request_reissue` update."""
    if name == REISSUE_UPDATE and args and isinstance(args[0], ReissueAsk):
        return args[0]
    return _approval_arg(name, APPROVAL_UPDATE, args)


class _SealingOutbound(client.OutboundInterceptor):
    def __init__(self, next: client.OutboundInterceptor, keys: ApprovalKeys) -> None:
        super().__init__(next)
        self._keys = keys

    async def _sealed(self, workflow_id: str, run_id: str | None, signal: Sealed,
                      headers: Mapping[str, Payload]) -> dict[str, Payload]:
        """The headers with a seal for the run chain the workflow id names now (one describe:
        the verdict is for the round that chain holds, never a later one under the same id)."""
        described = await self.next.describe_workflow(client.DescribeWorkflowInput(
            id=workflow_id, run_id=run_id, rpc_metadata={}, rpc_timeout=None))
        chain = described.raw_description.workflow_execution_info.first_run_id
        if not chain:  # a seal over no chain would be refused by every worker, silently
            raise RuntimeError(f"Temporal names no run chain (first_run_id) for {workflow_id}: "
                               "approvals cannot be sealed; upgrade the Temporal server")
        seal = self._keys.seal(workflow_id, signal, chain=chain, now=datetime.now(UTC))
        return {**headers, SEAL_HEADER: _HEADER_CONVERTER.to_payloads([seal])[0]}

    async def signal_workflow(self, input: client.SignalWorkflowInput) -> None:
        signal = _approval_arg(input.signal, APPROVE_SIGNAL, input.args)
        if signal is not None:
            input = dataclasses.replace(input, headers=await self._sealed(input.id, input.run_id, signal,
                                                                           input.headers))
        await super().signal_workflow(input)

    async def start_workflow_update(
            self, input: client.StartWorkflowUpdateInput) -> client.WorkflowUpdateHandle[Any]:
        signal = _sealed_update_arg(input.update, input.args)
        if signal is not None:
            input = dataclasses.replace(input, headers=await self._sealed(input.id, input.run_id, signal,
                                                                           input.headers))
        return await super().start_workflow_update(input)


class _NewsSealingOutbound(client.OutboundInterceptor):
    def __init__(self, next: client.OutboundInterceptor, keys: ApprovalKeys) -> None:
        super().__init__(next)
        self._keys = keys

    async def signal_workflow(self, input: client.SignalWorkflowInput) -> None:
        headers = _with_news_seal(self._keys, input.id, input.signal, input.args, input.headers)
        await super().signal_workflow(dataclasses.replace(input, headers=headers))

    async def start_workflow(self, input: client.StartWorkflowInput) -> client.WorkflowHandle[Any, Any]:
        """A signal-with-start: the start's headers are the signal's too."""
        headers = _with_news_seal(self._keys, input.id, input.start_signal, input.start_signal_args,
                                  input.headers)
        return await super().start_workflow(dataclasses.replace(input, headers=headers))


class NewsSealing(client.Interceptor):
    """On every product client holding the keys: seals the provider news it signals."""

    def __init__(self, keys: ApprovalKeys) -> None:
        self._keys = keys

    def intercept_client(self, next: client.OutboundInterceptor) -> client.OutboundInterceptor:
        return _NewsSealingOutbound(next, self._keys)


class ApprovalSealing(client.Interceptor):
    """On the relay's client: seals every approval it sends."""

    def __init__(self, keys: ApprovalKeys) -> None:
        self._keys = keys

    def intercept_client(self, next: client.OutboundInterceptor) -> client.OutboundInterceptor:
        return _SealingOutbound(next, self._keys)


def sealing_client(base: client.Client, keys: ApprovalKeys | None) -> client.Client:
    """The relay's client: the same connection and converter, plus the sealing interceptors,
    approvals' and (unless `connect` gave it already) news' (unchanged without keys: its
    approvals then count nowhere)."""
    if keys is None:
        return base
    config = base.config()
    news = [] if any(isinstance(i, NewsSealing) for i in config["interceptors"]) else [NewsSealing(keys)]
    config["interceptors"] = [*config["interceptors"], *news, ApprovalSealing(keys)]
    return client.Client(**config)


class _NewsSealingWorkflowOutbound(WorkflowOutboundInterceptor):
    """Seals the news a workflow signals to another case (a reconciliation break handing
    the provider's word to its case): deterministic, the seal is over the event alone."""

    def __init__(self, next: WorkflowOutboundInterceptor, keys: ApprovalKeys) -> None:
        super().__init__(next)
        self._keys = keys

    def signal_external_workflow(self, input: SignalExternalWorkflowInput) -> Coroutine[Any, Any, None]:
        headers = _with_news_seal(self._keys, input.workflow_id, input.signal, input.args, input.headers)
        return super().signal_external_workflow(dataclasses.replace(input, headers=headers))


def _header_seal(headers: Mapping[str, Payload], name: str) -> str | None:
    """The seal a caller put in header `name` (None when there is none); whatever else a
    caller put there is read as a seal that holds nothing."""
    header = headers.get(name)
    if header is None:
        return None
    try:
        seal = _HEADER_CONVERTER.from_payloads([header], [str])[0]
    except Exception:  # whatever a caller put there, it is no seal
        return "unreadable"
    return seal if isinstance(seal, str) else None


class _SealCheckingInbound(WorkflowInboundInterceptor):
    """Replaces the verdict of an `approve` signal or a `submit_approval` update with a
    `CheckedApproval`, and the event of a news signal with a `CheckedProviderEvent` or
    `CheckedPayoutEvent`. A nonce counts once per run (a resent sealed verdict is refused)."""

    keys: ApprovalKeys | None = None

    def __init__(self, next: WorkflowInboundInterceptor) -> None:
        super().__init__(next)
        self._used_nonces: set[str] = set()

    def init(self, outbound: WorkflowOutboundInterceptor) -> None:
        super().init(outbound if self.keys is None else _NewsSealingWorkflowOutbound(outbound, self.keys))

    def _checked_news(self, signal: str, event: ProviderEvent | PayoutEvent,
                      headers: Mapping[str, Payload]) -> CheckedProviderEvent | CheckedPayoutEvent:
        """The event with why its seal does not hold ("" when it does). A worker without keys
        takes none, as it counts no approval: news it cannot check could be anyone's."""
        refusal = "the worker holds no approval keys (REFUNDS_APPROVAL_KEYS): it takes no provider news"
        if self.keys is not None:
            refusal = self.keys.check_news(workflow.info().workflow_id, signal, event,
                                           _header_seal(headers, NEWS_HEADER))
        checked = CheckedProviderEvent if isinstance(event, ProviderEvent) else CheckedPayoutEvent
        return checked.model_validate({**event.model_dump(), "refusal": refusal})

    def _refusal(self, signal: Sealed, headers: Mapping[str, Payload]) -> tuple[str, bool]:
        """Why the seal in `headers` does not hold for `signal` ("" when it does), and whether
        it held but past its window (`late`); notes its nonce."""
        if self.keys is None:
            refusal, nonce = "the worker holds no approval keys (REFUNDS_APPROVAL_KEYS)", ""
        else:
            info = workflow.info()
            refusal, nonce = self.keys.check(
                info.workflow_id, signal, _header_seal(headers, SEAL_HEADER),
                chain=info.first_execution_run_id, now=workflow.now())
        late = refusal == OUTSIDE_WINDOW and bool(nonce)
        if (late or not refusal) and nonce in self._used_nonces:
            return "approval seal was already used", False
        if late or not refusal:
            self._used_nonces.add(nonce)
        return refusal, late

    def _checked(self, signal: Sealed, headers: Mapping[str, Payload]) -> CheckedApproval | CheckedReissueAsk:
        refusal, late = self._refusal(signal, headers)
        if isinstance(signal, ReissueAsk):
            return CheckedReissueAsk.model_validate({**signal.model_dump(), "refusal": refusal})
        held = _header_seal(headers, SEAL_HEADER) if not refusal else None
        return CheckedApproval.model_validate({**signal.model_dump(), "refusal": refusal, "late": late,
                                               "sealed_at": sealed_at(held) if held else None})

    async def handle_signal(self, input: HandleSignalInput) -> None:
        signal = _approval_arg(input.signal, APPROVE_SIGNAL, input.args)
        if signal is not None:
            input = dataclasses.replace(input, args=[self._checked(signal, input.headers), *input.args[1:]])
        elif (event := _news_arg(input.signal, input.args)) is not None:
            input = dataclasses.replace(
                input, args=[self._checked_news(input.signal, event, input.headers), *input.args[1:]])
        await super().handle_signal(input)

    async def handle_update_handler(self, input: HandleUpdateInput) -> Any:
        signal = _sealed_update_arg(input.update, input.args)
        if signal is not None:
            input = dataclasses.replace(input, args=[self._checked(signal, input.headers), *input.args[1:]])
        return await super().handle_update_handler(input)


class ApprovalSealCheck(Interceptor):
    """On the worker: checks every approval's seal before the workflow sees it."""

    def __init__(self, keys: ApprovalKeys | None) -> None:
        self._inbound = type("ApprovalSealCheckInbound", (_SealCheckingInbound,), {"keys": keys})

    def workflow_interceptor_class(
            self, input: WorkflowInterceptorClassInput) -> type[WorkflowInboundInterceptor] | None:
        return self._inbound
