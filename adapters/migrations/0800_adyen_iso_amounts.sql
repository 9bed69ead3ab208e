-- Adyen counts IDR and CVE without decimals and CLP and ISK with two, where ISO 4217 (our
-- unit everywhere) counts two and none. Its adapter now converts where amounts cross;
-- notifications recorded before that hold Adyen's units, which validation would read as
-- ours (a 150,000 IDR payment as 1,500.00). Put them in ours. A CLP or ISK amount with
-- hundredths has no ISO equal: it is rounded down, so a captured amount never grows.
UPDATE payment_notifications SET amount = amount * 100
 WHERE provider = 'adyen' AND currency IN ('IDR', 'CVE');
UPDATE payment_notifications SET amount = amount / 100
 WHERE provider = 'adyen' AND currency IN ('CLP', 'ISK');
