-- Integrations: per-channel notice deliveries, tickets per case, links from chat and
-- ticketing identities to our users, and the AI advisor's (advisory) output.

-- At most one delivery per notice and channel. The row is claimed ('sending') before the
-- send, so a retried activity never sends twice: only a definite failure ('failed') frees
-- it for another attempt; a claim found still 'sending' becomes 'uncertain' and is left.
CREATE TABLE notice_deliveries (
    notice_id     BIGINT      NOT NULL REFERENCES notices (id),
    channel       TEXT        NOT NULL,
    status        TEXT        NOT NULL CHECK (status IN ('sending', 'delivered', 'failed', 'uncertain')),
    attempts      INT         NOT NULL DEFAULT 1,
    external_id   TEXT,
    last_error    TEXT,
    claimed_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    delivered_at  TIMESTAMPTZ,
    PRIMARY KEY (notice_id, channel)
);

-- At most one ticket per case, system and purpose ('request', or 'incident:<kind>'): a
-- retried activity finds the stored id instead of creating another.
CREATE TABLE case_tickets (
    refund_request_id  TEXT        NOT NULL,
    system             TEXT        NOT NULL,
    purpose            TEXT        NOT NULL,
    external_id        TEXT        NOT NULL,
    number             TEXT,
    url                TEXT,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (refund_request_id, system, purpose)
);
CREATE UNIQUE INDEX case_tickets_external ON case_tickets (system, external_id, purpose);

-- Who a Slack or ServiceNow user is here. Roles still come only from our tokens.
CREATE TABLE identity_links (
    system       TEXT        NOT NULL CHECK (system IN ('slack', 'servicenow')),
    external_id  TEXT        NOT NULL,
    user_name    TEXT        NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (system, external_id)
);

-- The advisor's recommendation for a case (NULL advice = "no advice", with the error).
-- Nothing that decides or executes reads this table.
CREATE TABLE case_advice (
    refund_request_id  TEXT        PRIMARY KEY REFERENCES refund_cases (refund_request_id),
    source             TEXT        NOT NULL,
    advice             JSONB,
    error              TEXT,
    context_sha256     TEXT        NOT NULL,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now()
);
