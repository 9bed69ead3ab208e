-- Ops console: sign-in sessions made from API tokens.
-- The session id lives only in the browser's cookie; we keep its SHA-256, like tokens.
-- A session is only as good as its token: every lookup joins api_tokens and requires the
-- token to be unrevoked, so revoking a token ends its sessions at once.
CREATE TABLE console_sessions (
    id            BIGSERIAL PRIMARY KEY,
    session_hash  TEXT        NOT NULL UNIQUE,
    token_id      BIGINT      NOT NULL REFERENCES api_tokens (id),
    csrf_token    TEXT        NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at    TIMESTAMPTZ NOT NULL,
    ended_at      TIMESTAMPTZ
);
CREATE INDEX console_sessions_token ON console_sessions (token_id);
