"""What the API and the workers must agree on: catalog, schemas, settings, the job store (keys, record, scripts)."""
