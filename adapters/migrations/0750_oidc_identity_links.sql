-- A person signed in to the Temporal UI with OIDC is named by one claim of their access token
-- (REFUNDS_OIDC_USER_CLAIM); a link makes them a user here. Roles still come only from our tokens.
ALTER TABLE identity_links DROP CONSTRAINT identity_links_system_check;
ALTER TABLE identity_links ADD CONSTRAINT identity_links_system_check
    CHECK (system IN ('slack', 'servicenow', 'oidc'));
