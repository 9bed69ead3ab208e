"""The fast tier's fake activities: one per contract, registered under the contract's
name beside the real workflow classes (the Temporal samples' mocked-activity pattern), so
a workflow branch runs against the shared dev server in well under a second, with no
relay, PostgreSQL or provider. Each fake records its input; a test scripts the answers
that lead into the branch it covers and asserts on what was called. A contract that folds
others' work into one transaction (`validate_and_decide`, `write_case_steps`, a submit
carrying its `before` writes and `started` event) is answered by those others' fakes in the
order the store writes them, so a scripted ledger failure or policy verdict reaches the
folded step too; fakes answer local activity calls (`Activity.local`) as they answer the
others. (A fake writes a guarded write, `unless_submitted`, as any other.)"""

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

from temporalio import activity
from temporalio.client import Client
from temporalio.worker import Worker

from adapters.approval_seal import ApprovalKeys, ApprovalSealCheck
from domain import contracts
from domain.contracts import Activity
from domain.models import CaseWrite, CaseWrites, CaseWritten, PolicyInput, SubmitInput, ValidateInput, Vetted
from domain.reconciliation import BreakCase
from tests.harness import APPROVAL_KEYS
from workers.main import WORKFLOWS, workflow_runner

InputT = TypeVar("InputT")
ResultT = TypeVar("ResultT")
Answer = Callable[[Any], Awaitable[Any]]

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def returns(value: Any) -> Answer:
    """An answer that always gives `value` (or raises it, when it is an exception)."""
    async def answer(_: Any) -> Any:
        if isinstance(value, BaseException):
            raise value
        return value
    return answer


class FakeActivities:
    """Every contract's fake; unscripted ones answer with `defaults` (None when absent)."""

    def __init__(self, defaults: dict[str, Any]) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.advised_in_validation = False  # as the product's in-process advisor does
        self._answers: dict[str, list[Answer]] = {name: [returns(value)] for name, value in defaults.items()}

    def script(self, contract: Activity[InputT, ResultT], *answers: ResultT | BaseException | Answer) -> None:
        """Successive calls get these answers in turn (values, exceptions to raise, or async
        functions of the input); the last one repeats."""
        self._answers[contract.name] = [a if callable(a) and not isinstance(a, BaseException) else returns(a)
                                        for a in answers]

    def inputs(self, contract: Activity[InputT, ResultT]) -> list[InputT]:
        return [inp for name, inp in self.calls if name == contract.name]

    def names(self, *only: Activity[Any, Any]) -> list[str]:
        """The activities called, in order (only those given, when any are)."""
        wanted = {c.name for c in only}
        return [name for name, _ in self.calls if not wanted or name in wanted]

    def recorded(self) -> list[str]:
        """The actions a case recorded (refund, payout and break events), in order."""
        kinds = (contracts.RECORD_CASE_EVENT.name, contracts.RECORD_PAYOUT_CASE_EVENT.name)
        return [inp.action for name, inp in self.calls if name in kinds]

    async def seen(self, action: str) -> None:
        """Until the case has recorded `action` (the test's timeout bounds it)."""
        while action not in self.recorded():
            await asyncio.sleep(0.05)

    def registered(self) -> list[Callable[..., Any]]:
        folded: dict[str, Answer] = {contracts.VALIDATE_AND_DECIDE.name: self._vet,
                                     contracts.WRITE_CASE_STEPS.name: self._write,
                                     contracts.SUBMIT_PROVIDER_REFUND.name: self._submit,
                                     contracts.LOAD_BREAK_CASE.name: self._stored_break}
        return [self._fake(contract, folded.get(contract.name)) for contract in contracts.ALL]

    async def _answer(self, name: str, inp: Any) -> Any:
        """Records a call of `name` and gives its next answer."""
        self.calls.append((name, inp))
        answers = self._answers.get(name) or [returns(None)]
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        return await answer(inp)

    async def _vet(self, inp: ValidateInput) -> Vetted:
        validation = await self._answer(contracts.VALIDATE_REFUND.name, inp)
        if not validation.ok:
            return Vetted(validation=validation)
        decision = await self._answer(contracts.DECIDE_POLICY.name,
                                      PolicyInput(request=inp.request, validation=validation))
        return Vetted(validation=validation, decision=decision, advised=self.advised_in_validation)

    async def _write(self, inp: CaseWrites) -> CaseWritten:
        posting = await self._answer(contracts.POST_LEDGER.name, inp.posting) if inp.posting else None
        await self._queue_and_record(inp.writes)
        return CaseWritten(posting=posting, posted=inp.posting.kind if inp.posting else None,
                           actions=tuple(w.event.action for w in inp.writes if w.event is not None))

    async def _queue_and_record(self, writes: tuple[CaseWrite, ...]) -> None:
        for write in writes:
            if write.notice is not None:
                await self._answer(contracts.QUEUE_NOTICE.name, write.notice)
            elif write.event is not None:
                await self._answer(contracts.RECORD_CASE_EVENT.name, write.event)

    @staticmethod
    async def _stored_break(inp: BreakCase) -> BreakCase:
        """The break as stored: the one the test started its workflow with."""
        return inp

    async def _submit(self, inp: SubmitInput) -> Any:
        # committed with the intent, before the provider answers
        await self._queue_and_record(inp.intent_writes())
        return await self._answer(contracts.SUBMIT_PROVIDER_REFUND.name, inp)

    def _fake(self, contract: Activity[Any, Any], folded: Answer | None) -> Callable[..., Any]:
        async def fake(inp: Any) -> Any:
            if folded is None:
                return await self._answer(contract.name, inp)
            if contract.name != contracts.SUBMIT_PROVIDER_REFUND.name:
                self.calls.append((contract.name, inp))
            return await folded(inp)
        fake.__name__ = contract.name
        fake.__annotations__ = {"inp": contract.input, "return": contract.result}
        return activity.defn(name=contract.name)(fake)


@asynccontextmanager
async def fake_worker(client: Client, fakes: FakeActivities) -> AsyncIterator[str]:
    """A worker with the product's real workflows and the fakes, on a fresh task queue."""
    task_queue = f"fast-{uuid.uuid4().hex[:12]}"
    async with Worker(client, task_queue=task_queue, workflows=list(WORKFLOWS),
                      activities=fakes.registered(), workflow_runner=workflow_runner(),
                      interceptors=[ApprovalSealCheck(ApprovalKeys([APPROVAL_KEYS]))]):
        yield task_queue
