-- Payments as their notifications reported them, for providers with no payment lookup
-- (Adyen): validation reads a charge's captured and refunded amounts from here. One row per
-- notification, keyed like the webhook gate, so a re-driven or replayed delivery records
-- nothing twice. psp_reference is the notification's own object (the payment, a capture,
-- a cancellation or a refund); payment_id the payment it is about.
CREATE TABLE payment_notifications (
    provider          TEXT   NOT NULL,
    event_id          TEXT   NOT NULL,
    event_type        TEXT   NOT NULL,
    payment_id        TEXT   NOT NULL,
    psp_reference     TEXT   NOT NULL,
    status            TEXT   NOT NULL CHECK (status IN ('authorised', 'refused', 'captured',
                             'capture_failed', 'cancelled', 'cancel_failed', 'refunded',
                             'refund_pending', 'refund_failed')),
    amount            BIGINT NOT NULL CHECK (amount >= 0),
    currency          TEXT   NOT NULL,
    merchant_account  TEXT   NOT NULL,
    occurred_at       TIMESTAMPTZ NOT NULL,
    recorded_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, event_id)
);
CREATE INDEX payment_notifications_payment ON payment_notifications (provider, payment_id);
