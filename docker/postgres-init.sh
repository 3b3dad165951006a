#!/bin/sh
# One login role per service, each owning only its own databases. The postgres image runs this once, as
# the superuser, on the first start with an empty data volume (it is mounted into
# /docker-entrypoint-initdb.d by compose.yaml). Names and passwords come from docker/.env.
#   prefect role: owns `prefect`
#   mlflow role:  owns `mlflow` (runs, models) and `mlflow_auth` (basic-auth users and grants)
# Neither role is a superuser or may create roles or databases, and PUBLIC loses its default CONNECT on
# all three databases, so each service can open only its own. Values reach SQL as psql variables
# (:"name" quotes an identifier, :'name' a literal), never pasted into the statement text.
set -e

: "${POSTGRES_USER:?}" "${PREFECT_DB_USER:?}" "${PREFECT_DB_PASSWORD:?}" "${MLFLOW_DB_USER:?}" "${MLFLOW_DB_PASSWORD:?}"
if [ "$PREFECT_DB_USER" = "$MLFLOW_DB_USER" ] || [ "$PREFECT_DB_USER" = "$POSTGRES_USER" ] \
   || [ "$MLFLOW_DB_USER" = "$POSTGRES_USER" ]; then
    echo "postgres-init: PREFECT_DB_USER, MLFLOW_DB_USER and POSTGRES_USER must be three different roles" >&2
    exit 1
fi

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v prefect_user="$PREFECT_DB_USER" -v prefect_password="$PREFECT_DB_PASSWORD" \
    -v mlflow_user="$MLFLOW_DB_USER" -v mlflow_password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE :"prefect_user" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'prefect_password';
CREATE ROLE :"mlflow_user" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'mlflow_password';

CREATE DATABASE prefect OWNER :"prefect_user";
CREATE DATABASE mlflow OWNER :"mlflow_user";
CREATE DATABASE mlflow_auth OWNER :"mlflow_user";

REVOKE ALL ON DATABASE prefect FROM PUBLIC;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
REVOKE ALL ON DATABASE mlflow_auth FROM PUBLIC;

-- Prefect's migrations ask for pg_trgm; create it here so the prefect role needs no extra rights.
\connect prefect
CREATE EXTENSION IF NOT EXISTS pg_trgm;
SQL
