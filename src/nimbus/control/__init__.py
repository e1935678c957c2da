"""Control API (deploy, invoke, logs, status) and deploy orchestration."""
