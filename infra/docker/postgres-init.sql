-- One Postgres for the local stack: separate databases for Airflow's and MLflow's metadata.
CREATE DATABASE airflow OWNER lake;
CREATE DATABASE mlflow OWNER lake;
