-- Adyen's dispute notifications (NOTIFICATION_OF_CHARGEBACK, REQUEST_FOR_INFORMATION,
-- CHARGEBACK, DISPUTE_OPENED_WITH_CHARGEBACK) are recorded beside the payment's other
-- notifications: validation counts a payment's disputes from them.

ALTER TABLE payment_notifications
    DROP CONSTRAINT payment_notifications_status_check,
    ADD CONSTRAINT payment_notifications_status_check CHECK (status IN ('authorised', 'refused',
        'captured', 'capture_failed', 'cancelled', 'cancel_failed', 'refunded', 'refund_pending',
        'refund_failed', 'disputed'));
