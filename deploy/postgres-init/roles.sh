#!/bin/sh
# Runs once, on the first start of an empty data directory (the postgres image's
# /docker-entrypoint-initdb.d), as the superuser. Creates the three roles and the product's
# database; the passwords come from the container's environment (deploy/.env), read by
# psql itself (\getenv), never on its command line, where `ps` would show them.
set -eu
: "${MIGRATION_DB_PASSWORD:?}" "${RUNTIME_DB_PASSWORD:?}" "${TEMPORAL_DB_PASSWORD:?}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres <<'SQL'
\getenv migration_pw MIGRATION_DB_PASSWORD
\getenv runtime_pw RUNTIME_DB_PASSWORD
\getenv temporal_pw TEMPORAL_DB_PASSWORD
-- Owns the product's schema; only `refunds migrate` connects as it.
CREATE ROLE refunds_owner LOGIN PASSWORD :'migration_pw';
-- Relay and worker: rows only (granted by `refunds migrate`); no DDL, no trigger control.
CREATE ROLE refunds_app LOGIN PASSWORD :'runtime_pw' NOSUPERUSER NOCREATEDB NOCREATEROLE;
-- Temporal's own role: auto-setup creates its two databases.
CREATE ROLE temporal LOGIN PASSWORD :'temporal_pw' CREATEDB;
CREATE DATABASE refunds OWNER refunds_owner;
REVOKE ALL ON DATABASE refunds FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE refunds TO refunds_app;
SQL
