-- Prefect uses the default database; MLflow keeps runs and its auth users in databases of their own.
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
