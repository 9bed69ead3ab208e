"""The set-based statements of a reconciliation batch: the staging table, and the one
statement per batch that classifies a provider's refunds (or payouts) against our cases,
payouts and ledger, inserts the breaks not seen before and links every break seen to the run.

Kept apart from the repository (`reconciliation.py`): these are the SQL a reviewer reads
as one piece, with nothing else between them.
"""

STAGE = """
CREATE TEMP TABLE recon_batch (
    object_id TEXT PRIMARY KEY, charge_id TEXT NOT NULL, amount BIGINT NOT NULL,
    currency TEXT NOT NULL, status TEXT NOT NULL, raw_status TEXT NOT NULL, failure_reason TEXT,
    reference TEXT, created_at TIMESTAMPTZ NOT NULL
) ON COMMIT DROP
"""

# Both classifications end alike: link every break seen to this run. Rows inserted by a CTE
# are invisible to the rest of the statement, hence the UNION with `inserted`.
LINK = """, linked AS (
    INSERT INTO reconciliation_run_breaks (run_id, break_id)
    SELECT %(run_id)s, r.id FROM classified c JOIN reconciliation_breaks r
        ON r.provider = %(provider)s AND r.object_id = c.object_id AND r.break_class = c.break_class
    UNION ALL SELECT %(run_id)s, id FROM inserted
    ON CONFLICT DO NOTHING
)
SELECT * FROM inserted ORDER BY id
"""

# One statement per batch: match each provider object to its case (by the refund id the case
# recorded, else by our reference in the provider's metadata) and to that case's ledger
# position, flag every class of difference, insert the breaks not seen before, and link every
# break seen to this run (LINK).
NEW_EVIDENCE_KEEPING_REOPENERS = """CASE WHEN reconciliation_breaks.evidence ? 'reopened_by'
        THEN jsonb_set(EXCLUDED.evidence, '{reopened_by}', reconciliation_breaks.evidence->'reopened_by')
        ELSE EXCLUDED.evidence END"""
"""A break raised again takes the new finding's evidence, but whoever reopened it is still
behind it (`behind_break`): the rest of a compensation they asked for, or a payout's next
round, is not theirs to approve either."""

CLASSIFY = """
WITH matched AS (
    SELECT b.*, c.refund_request_id AS case_id, c.status AS case_status, c.amount AS case_amount,
           c.currency AS case_currency, c.provider_status AS case_provider_status,
           c.requester AS case_requester, c.trigger_identities AS case_trigger_identities,
           coalesce(c.provider_refund_id = b.object_id, false) AS case_holds_refund,
           c.provider_refund_id AS case_refund_id,
           -- another refund carrying the case's reference while the case holds its own: a
           -- duplicate, never the case's refund changing state (an ops "no refund" names none)
           coalesce(c.provider_refund_id <> b.object_id
                    AND c.provider_refund_id NOT LIKE %(no_refund)s, false) AS duplicate,
           coalesce(l.net, 0) AS ledger_net,
           CASE WHEN b.status = 'succeeded' THEN b.amount ELSE 0 END AS expected_net
    FROM recon_batch b
    LEFT JOIN LATERAL (
        SELECT * FROM refund_cases c
        WHERE c.provider = %(provider)s
          -- by our reference only on the case's own charge: a refund off another charge
          -- moved that charge's money, whatever reference it carries
          AND (c.provider_refund_id = b.object_id
               OR (c.refund_request_id = b.reference AND c.charge_id = b.charge_id))
        ORDER BY c.provider_refund_id = b.object_id DESC NULLS LAST LIMIT 1) c ON true
    LEFT JOIN LATERAL (
        SELECT sum(li.debit - li.credit) AS net
        FROM ledger_entries e JOIN ledger_lines li ON li.entry_id = e.id
        WHERE e.refund_request_id = c.refund_request_id AND li.account = %(account)s) l ON true
    WHERE b.created_at < %(judge_before)s
), reviewed AS (
    -- a case its workflow keeps in ops review after it applied (and booked) its refund's
    -- success (a duplicate, a mismatch, a contradiction): it shows what the provider says
    SELECT m.*, coalesce(m.case_status = %(in_review)s AND m.case_holds_refund
                         AND m.case_provider_status = 'succeeded', false) AS reviewed_success
    FROM matched m
), flagged AS (
    SELECT m.*,
           m.case_id IS NULL AS unknown,
           CASE WHEN m.case_id IS NULL OR m.duplicate THEN NULL
                WHEN m.status IN ('failed', 'canceled') AND m.case_status = ANY(%(shown_refunded)s)
                    THEN 'provider_failed_shown_refunded'
                WHEN m.status = 'succeeded' AND m.case_status = ANY(%(shown_pending)s)
                     AND NOT m.reviewed_success
                    THEN 'provider_succeeded_shown_pending'
                WHEN m.status = 'succeeded' AND m.case_status = ANY(%(shown_failed)s)
                    THEN 'provider_succeeded_shown_failed' END AS status_break,
           NOT m.duplicate AND coalesce(m.case_amount <> m.amount, false) AS amount_break,
           NOT m.duplicate AND coalesce(m.case_currency <> m.currency, false) AS currency_break,
           m.case_id IS NOT NULL AND NOT m.duplicate AND m.created_at < %(stuck_before)s
               AND (m.status = ANY(%(non_terminal)s)
                    OR (m.case_status = ANY(%(shown_pending)s) AND m.status IN ('failed', 'canceled')))
               AS stuck,
           -- ledger breaks only where the case's status agrees with the provider's
           m.case_id IS NOT NULL AND NOT m.duplicate AND (
               (m.status = 'succeeded' AND (m.case_status = ANY(%(shown_refunded)s) OR m.reviewed_success))
               OR (m.status IN ('failed', 'canceled') AND m.case_status = ANY(%(shown_failed)s))
               OR (m.status = ANY(%(non_terminal)s) AND m.case_status = ANY(%(shown_pending)s)))
               AS statuses_agree
    FROM reviewed m
), classified AS (
    SELECT f.*, k.break_class FROM flagged f CROSS JOIN LATERAL unnest(
        CASE WHEN f.status = %(unmapped)s THEN ARRAY['unmapped_status'] ELSE array_remove(ARRAY[
        CASE WHEN f.unknown THEN 'unknown_to_us' END,
        CASE WHEN f.duplicate AND f.status NOT IN ('failed', 'canceled') THEN 'duplicate_refund' END,
        f.status_break,
        CASE WHEN f.amount_break THEN 'amount_mismatch' END,
        CASE WHEN f.currency_break THEN 'currency_mismatch' END,
        CASE WHEN f.stuck THEN 'stuck_non_terminal' END,
        CASE WHEN f.statuses_agree AND NOT f.amount_break AND NOT f.currency_break THEN
            CASE WHEN f.ledger_net > f.amount OR f.ledger_net < 0 THEN 'ledger_doubled'
                 -- a case whose own entry is pending lands it itself (a second would double)
                 WHEN f.ledger_net <> f.expected_net AND f.case_status <> %(ledger_pending)s
                     THEN 'ledger_missing' END END
    ], NULL) END) AS k(break_class)
), unmoved AS (
    -- a refund a break said moved or might move money outside its case that failed or was
    -- canceled since moved none: its break says so (a reissue of the request reads it) and
    -- keeps its state. A duplicate raised while it might still pay (it stays with ops), and a
    -- refund of a case shown failed whose break was denied or expired (nothing else raises
    -- it again)
    UPDATE reconciliation_breaks r SET provider_status = f.status, raw_status = f.raw_status,
        failure_reason = f.failure_reason,
        ledger_delta = CASE WHEN f.duplicate THEN f.expected_net ELSE r.ledger_delta END,
        evidence = jsonb_set(r.evidence, '{provider}', coalesce(r.evidence->'provider', '{}')
            || jsonb_build_object('status', f.status, 'raw_status', f.raw_status,
                                  'failure_reason', f.failure_reason))
    FROM flagged f
    WHERE f.status IN ('failed', 'canceled') AND r.provider = %(provider)s AND r.object_id = f.object_id
      AND r.provider_status IS DISTINCT FROM f.status
      AND ((f.duplicate AND r.break_class = 'duplicate_refund')
           OR (NOT f.duplicate AND r.break_class IN ('provider_succeeded_shown_failed', 'stuck_non_terminal')
               AND r.state IN ('dismissed', 'expired')))
), inserted AS (
    INSERT INTO reconciliation_breaks (
        provider, object_id, break_class, refund_request_id, chain, charge_id, amount, currency,
        provider_status, raw_status, failure_reason, case_status, ledger_delta, object_created_at,
        evidence, first_run_id, state)
    SELECT %(provider)s, object_id, break_class, case_id,
           coalesce(case_id, %(tracking_prefix)s || object_id), charge_id, amount, currency, status,
           raw_status, failure_reason, case_status,
           CASE WHEN status = %(unmapped)s THEN NULL WHEN case_id IS NULL OR duplicate THEN expected_net
                WHEN currency = case_currency THEN expected_net - ledger_net END,
           created_at,
           jsonb_build_object(
               'provider', jsonb_build_object('status', status, 'raw_status', raw_status,
                   'failure_reason', failure_reason, 'amount', amount, 'currency', currency,
                   'charge_id', charge_id, 'created', created_at, 'reference', reference),
               'case', CASE WHEN case_id IS NOT NULL THEN jsonb_build_object('id', case_id,
                   'status', case_status, 'amount', case_amount, 'currency', case_currency,
                   'provider_status', case_provider_status, 'holds_refund', case_holds_refund,
                   'provider_refund_id', case_refund_id,
                   'requester', case_requester, 'trigger_identities', case_trigger_identities) END,
               'ledger', jsonb_build_object('net', ledger_net, 'expected', expected_net)),
           %(run_id)s,
           CASE WHEN status = %(unmapped)s OR break_class = 'duplicate_refund' THEN 'ops_review'
                ELSE 'new' END
    FROM classified
    -- a resolved break of a class its resolution removes, found again: raised again, as new
    -- in this run (`RAISED_AGAIN`); so is one its settlement sent to ops review for people
    -- to look again (`LOOK_AGAIN`: nothing acts on a break in ops review); a duplicate
    -- refund that has since succeeded (first seen pending: money moved twice now) raised
    -- again for ops with what it moved;
    -- any other break seen again is only linked to the run
    ON CONFLICT (provider, object_id, break_class) DO UPDATE SET
        state = CASE WHEN reconciliation_breaks.break_class = 'duplicate_refund' THEN 'ops_review'
                     ELSE 'new' END,
        reopened = reconciliation_breaks.reopened + 1, resolution = NULL,
        resolved_at = NULL, dispatched_at = NULL, first_run_id = EXCLUDED.first_run_id,
        found_at = now(), ledger_delta = EXCLUDED.ledger_delta,
        evidence = """ + NEW_EVIDENCE_KEEPING_REOPENERS + """,
        case_status = EXCLUDED.case_status, provider_status = EXCLUDED.provider_status,
        raw_status = EXCLUDED.raw_status, failure_reason = EXCLUDED.failure_reason,
        amount = EXCLUDED.amount
      WHERE (reconciliation_breaks.break_class = ANY(%(raised_again)s)
             AND (reconciliation_breaks.state = 'resolved'
                  OR (reconciliation_breaks.state = 'ops_review'
                      AND reconciliation_breaks.resolution ?| %(look_again)s)))
         OR (reconciliation_breaks.break_class = 'duplicate_refund' AND EXCLUDED.provider_status = 'succeeded'
             AND reconciliation_breaks.provider_status IS DISTINCT FROM 'succeeded')
    RETURNING *
)""" + LINK  # noqa: S608 (constant text)

# Payouts: the provider failed, canceled or reversed a payout our books hold as paid (the
# payout exception case's own trigger, found without its webhook), or reported a status no
# table maps. Payout breaks live on the payout exception case's chain.
CLASSIFY_PAYOUTS = """
WITH classified AS (
    SELECT b.*, p.id AS payout_id, p.status AS our_status, p.amount AS our_amount,
           p.currency AS our_currency, p.beneficiary_id, k.break_class
    FROM recon_batch b
    LEFT JOIN payouts p ON p.provider = %(provider)s AND p.provider_payout_id = b.object_id
    CROSS JOIN LATERAL (SELECT CASE
        WHEN b.status = %(unmapped)s THEN 'unmapped_status'
        -- failed for another amount or currency than we booked: people look (the payout
        -- case's own admission sends such a report to ops review too), never a reversal
        WHEN b.status = ANY(%(payout_failed)s) AND p.status = %(paid)s AND b.currency <> p.currency
            THEN 'currency_mismatch'
        WHEN b.status = ANY(%(payout_failed)s) AND p.status = %(paid)s AND b.amount <> p.amount
            THEN 'amount_mismatch'
        WHEN b.status = ANY(%(payout_failed)s) AND p.status = %(paid)s THEN 'payout_failed_shown_paid'
        -- paid after all (a bank's correction) where our books took the money back: people
        -- look (a reissue may have paid the beneficiary twice), nothing moves by itself
        WHEN b.status = %(paid)s AND p.status <> %(paid)s AND EXISTS (
            SELECT 1 FROM ledger_entries e WHERE e.refund_request_id = %(case_prefix)s || b.object_id
            AND e.template = %(payout_reversed)s) THEN 'payout_paid_shown_failed'
        END AS break_class) k
    WHERE b.created_at < %(judge_before)s AND k.break_class IS NOT NULL
      -- a mismatch the payout case's admission raised already (its object is the case) is known
      AND NOT (k.break_class IN ('amount_mismatch', 'currency_mismatch') AND EXISTS (
          SELECT 1 FROM reconciliation_breaks r WHERE r.provider = %(provider)s
          AND r.object_id = %(case_prefix)s || b.object_id AND r.break_class = k.break_class))
), inserted AS (
    INSERT INTO reconciliation_breaks (
        provider, object_kind, object_id, break_class, refund_request_id, chain, charge_id, amount,
        currency, provider_status, raw_status, failure_reason, case_status, object_created_at,
        evidence, first_run_id, state)
    SELECT %(provider)s, 'payout', object_id, break_class,
           CASE WHEN payout_id IS NOT NULL THEN %(case_prefix)s || object_id END,
           %(case_prefix)s || object_id, charge_id, amount, currency, status, raw_status,
           failure_reason, our_status, created_at,
           jsonb_build_object(
               'provider', jsonb_build_object('status', status, 'raw_status', raw_status,
                   'failure_code', failure_reason, 'amount', amount, 'currency', currency,
                   'created', created_at, 'reference', reference),
               'payout', CASE WHEN payout_id IS NOT NULL THEN jsonb_build_object('id', payout_id,
                   'status', our_status, 'amount', our_amount, 'currency', our_currency,
                   'beneficiary_id', beneficiary_id) END),
           %(run_id)s, CASE WHEN break_class = 'payout_failed_shown_paid' THEN 'new' ELSE 'ops_review' END
    FROM classified
    -- a break handed to the payout's case, found again once that case ended leaving the
    -- payout paid (`ENDED_UNREVERSED`): raised again, as new in this run, for its own
    -- approval; any other break seen again is only linked to the run
    ON CONFLICT (provider, object_id, break_class) DO UPDATE SET
        state = 'new', reopened = reconciliation_breaks.reopened + 1, resolution = NULL,
        resolved_at = NULL, dispatched_at = NULL, first_run_id = EXCLUDED.first_run_id,
        found_at = now(), case_status = EXCLUDED.case_status,
        evidence = """ + NEW_EVIDENCE_KEEPING_REOPENERS + """,
        provider_status = EXCLUDED.provider_status, raw_status = EXCLUDED.raw_status,
        failure_reason = EXCLUDED.failure_reason
      WHERE reconciliation_breaks.state = 'handed_to_case'
        AND reconciliation_breaks.break_class = 'payout_failed_shown_paid'
        AND EXISTS (SELECT 1 FROM payout_cases c WHERE c.case_id = reconciliation_breaks.chain
                    AND c.status = ANY(%(case_ended)s))
    RETURNING *
)""" + LINK  # noqa: S608 (constant text)
