-- Runs once, on the first start of the Postgres container: MLflow gets its own database (Prefect uses POSTGRES_DB).
CREATE DATABASE mlflow OWNER dino;
