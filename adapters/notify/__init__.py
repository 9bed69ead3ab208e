"""Notice delivery: templates, and the channels (Slack, Teams, email, tickets)."""
