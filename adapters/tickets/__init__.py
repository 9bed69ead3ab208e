"""Ticketing systems (ServiceNow Table API, Jira Cloud REST) as notice channels."""
