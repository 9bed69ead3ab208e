"""What a person may do through any front end (the relay's API, the ops console), and the
rules for it: one set of role checks, state checks and audited refusals behind every
endpoint and every button."""
