"""The answers of a case's steps, by step key: what makes a local activity's writes happen
once when the activity runs again (see migration 0780). A step reads its key first and, when
found, answers as before without writing; otherwise it writes and keeps its answer in the
same transaction. Two runs at once: the second's insert conflicts and its transaction rolls
back; its retry finds the answer."""

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TypeVar

from psycopg.types.json import Jsonb
from pydantic import BaseModel

from adapters.db.database import Conn, Database, Repository

Answer = TypeVar("Answer", bound=BaseModel)


async def once(db: Database, step_key: str | None, case_id: str, answer_type: type[Answer],
               step: Callable[[Conn], Awaitable[Answer]], *,
               after_commit: Callable[[Answer], None] | None = None) -> Answer:
    """Runs `step` in one transaction and keeps its answer under `step_key` in it; a step
    whose key is kept gets that answer and `step` does not run. No key: `step` runs as is.
    `after_commit` (counting what the step wrote) gets the answer only when `step` ran and
    committed."""
    async with db.transaction() as conn:
        if step_key is not None:
            cur = await conn.execute("SELECT result FROM case_step_results WHERE step_key = %s", (step_key,))
            kept = await cur.fetchone()
            if kept is not None:
                return answer_type.model_validate(kept["result"])
        answer = await step(conn)
        if step_key is not None:
            await conn.execute(
                "INSERT INTO case_step_results (step_key, refund_request_id, result) VALUES (%s, %s, %s)",
                (step_key, case_id, Jsonb(answer.model_dump(mode="json"))))
    if after_commit is not None:
        after_commit(answer)
    return answer


class StepResults(Repository):
    """The kept answers' pruning."""

    async def prune(self, older_than: timedelta, limit: int) -> int:
        """Deletes up to `limit` answers older than `older_than`; returns how many."""
        return await self._db.execute(
            "DELETE FROM case_step_results WHERE step_key IN (SELECT step_key FROM case_step_results"
            " WHERE recorded_at < now() - %s ORDER BY recorded_at LIMIT %s)", (older_than, limit))
